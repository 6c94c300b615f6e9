"""`python -m dist_train` is the same CLI as the `dist-train` console script."""

from dist_train.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
