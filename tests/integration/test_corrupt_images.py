"""A corrupt image in the training data: one line naming the file, exit status 2, no traceback, no hang.

The image folder holds real JPEGs and one cut off half way (a failed copy). The run that
meets it stops with bad input (2, retrying would meet it again): in one process, with
DataLoader workers (whose exception torch re-raises wrapped in a traceback), and under
`dist-train launch` with two ranks, where the rank that reads the file leaves while its
peer waits in a collective.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from support.forkserver import shared

TRAIN = ["--dataset", "image_folder", "--model", "cnn", "--image-size", "16", "--epochs", "1", "--batch-size", "4",
         "--no-progress"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, the truncated file): train/ and val/ with two classes of small JPEGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("corrupt") / "images"
    for split in ("train", "val"):
        for c, label in enumerate(("cats", "dogs")):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (24, 20), (40 * i, 200 * c, 90)).save(root / split / label / f"{i}.jpg")
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, "JPEG")
    broken = root / "train" / "dogs" / "3.jpg"
    broken.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return root, broken


def check_one_line(stderr: str, broken: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("dist-train: error:")]
    assert len(lines) == 1, stderr
    assert re.fullmatch(f"dist-train: error: cannot read image {re.escape(str(broken))}: "
                        r"image file is truncated \(\d+ bytes not processed\)", lines[0]), stderr
    assert "Traceback" not in stderr, stderr


def test_a_worker_process_error_comes_out_as_the_same_one_line_error(images):
    from torch.utils.data import DataLoader

    from dist_train.data.config import DataConfig
    from dist_train.data.datasets import UnreadableImage
    from dist_train.data.registry import build_datasets

    root, broken = images
    bundle = build_datasets(DataConfig(dataset="image_folder", data_root=str(root), image_size=16), seed=0)
    message = None
    try:
        for _ in DataLoader(bundle.train, batch_size=4, num_workers=2):
            pass
    except UnreadableImage as exc:
        message = str(exc)
        exc.__traceback__ = None  # lets the loader's workers stop now rather than at the next garbage collection
    assert message is not None and re.fullmatch(f"cannot read image {re.escape(str(broken))}: image file is "
                                                r"truncated \(\d+ bytes not processed\)", message), message


@pytest.mark.timeout(300)
def test_one_process_with_dataloader_workers_exits_2_with_one_line(tmp_path, images):
    root, broken = images
    result = shared().run(["train", *TRAIN, "--data-root", str(root), "--run-dir", str(tmp_path / "run"),
                           "--num-workers", "2"], timeout=280)
    assert result.rc == 2, result.output
    check_one_line(result.stderr, broken)


@pytest.mark.timeout(300)
def test_two_ranks_under_launch_exit_2_and_the_peer_does_not_hang(tmp_path, images):
    root, broken = images
    result = shared().run(["launch", "--standalone", "--nproc-per-node", "2", "--", "train", *TRAIN,
                           "--data-root", str(root), "--run-dir", str(tmp_path / "run")], timeout=280)
    assert result.rc == 2, result.output
    check_one_line(result.stderr, broken)
    # the peer, whose collective failed when the other rank left, is stopped like torchrun stops it
    assert "exit status 2 (bad input)" in result.stderr.splitlines()[-1]
