"""`python -m dist_train` is the same CLI as the `dist-train` console script."""

from dist_train.cli.main import run

if __name__ == "__main__":
    run()
