"""A user's own package, outside dist_train: what `--model userpkg.models:build` and friends import.

Only the tests use it (with `tests/support` on PYTHONPATH, or as the current directory), to show
that dist_train trains, resumes, evaluates and exports code it has never seen.
"""
