"""A stand-in for the train task in runner tests: `python -m tests.sweep.fake_task MODE hydra.run.dir=DIR`."""

import json
import os
import sys
import time
from pathlib import Path

mode = sys.argv[1]
run_dir = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.run.dir=")))
if mode == "sleep":
    time.sleep(60)
if mode == "crash":
    print("error: dataset.root=/nowhere does not exist; set dataset.root.", file=sys.stderr)
    sys.exit(2)
# what the trial's trackers would tag their run with (segplat.engine.loggers reads these variables)
trial_facts = {k: os.environ.get(k) for k in ("SEGPLAT_STUDY_NAME", "SEGPLAT_TRIAL_NUMBER")}
(run_dir / "summary.json").write_text(json.dumps({"status": "completed", "best_score": 0.5, "env": trial_facts}))
