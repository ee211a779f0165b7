"""The `gptdist` sub-commands: argument parsing and the call into the package that does the work. gptdist/cli.py
registers them; nothing below this package imports it."""
