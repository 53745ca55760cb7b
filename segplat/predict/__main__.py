"""`python -m segplat.predict`."""

from segplat.predict import main

main()
