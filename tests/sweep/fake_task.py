"""A stand-in for the train task in runner tests: `python -m tests.sweep.fake_task MODE hydra.run.dir=DIR`.

MODE is the first plain word of the command line, else the value of an `x=MODE` override (so a sweep over
`x: choice(...)` picks each trial's behaviour): ok, crash (exit 2 with segplat's error sentence), sleep (60 s),
nap (2.5 s, then ok), pruned (a summary that says so). The summary records the environment the trial saw.
"""

import json
import os
import sys
import time
from pathlib import Path

words = [a for a in sys.argv[1:] if "=" not in a]
picked = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("x=")]
mode = (words or picked or ["ok"])[0]
run_dir = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.run.dir=")))
started = time.time()
if mode == "sleep":
    time.sleep(60)
if mode == "nap":
    time.sleep(2.5)
if mode == "crash":
    print("error: dataset.root=/nowhere does not exist; set dataset.root.", file=sys.stderr)
    sys.exit(2)
# what the trial's trackers would tag their run with (segplat.engine.loggers reads these variables)
trial_facts = {k: os.environ.get(k) for k in ("SEGPLAT_STUDY_NAME", "SEGPLAT_TRIAL_NUMBER")}
slot = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
status = "pruned" if mode == "pruned" else "completed"
(run_dir / "summary.json").write_text(json.dumps({"status": status, "best_score": 0.5, "env": trial_facts,
                                                  "slot": slot, "started": started, "ended": time.time()}))
