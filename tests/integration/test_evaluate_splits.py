"""`evaluate --split test` on a data set without a test split is refused, never answered with another split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_forked


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, colour in (("cat", 40), ("dog", 200)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.timeout(240)
def test_evaluate_split_test_without_a_test_folder_exits_2(tmp_path):
    data, run_dir = tmp_path / "images", tmp_path / "run"
    _image_folder(data)
    result = run_forked(["train", "--run-dir", str(run_dir), "--dataset", "image_folder", "--data-root", str(data),
                      "--image-size", "16", "--model", "mlp", "--batch-size", "4", "--max-steps", "2", "--epochs", "1",
                      "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    refused = run_forked(["evaluate", "--checkpoint", str(run_dir), "--split", "test"])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "no test split" in lines[0] and "Traceback" not in refused.stderr
    assert "val:" not in refused.stdout and "test:" not in refused.stdout
    scored = run_forked(["evaluate", "--checkpoint", str(run_dir), "--split", "val"])
    assert scored.returncode == 0 and "val: 8 samples" in scored.stdout, scored.stderr[-2000:]
