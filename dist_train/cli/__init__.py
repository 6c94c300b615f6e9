"""The `dist-train` command line: one sub-command per module, one exit-status policy."""
