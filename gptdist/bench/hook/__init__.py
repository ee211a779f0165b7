"""The PYTHONPATH folder of `gptdist bench parallel`'s measurement hook (see sitecustomize.py here)."""
