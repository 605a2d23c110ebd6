"""The shipped configs: one file per job, `get_config(arg)` with variants parsed from the argument."""
