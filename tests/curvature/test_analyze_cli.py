"""``fippure analyze`` on a tiny digits checkpoint writes a JSON report and a PNG."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from fippure import cli
from fippure.recipes import train_classifier
from fippure.training import TrainConfig


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_ckpt").resolve()
    train_classifier(
        dataset="digits",
        model="small_cnn",
        out=out,
        config=TrainConfig(epochs=2, batch_size=64, learning_rate=0.05, eval_every=2),
        model_kwargs={"width": 4},
        clean_size=30,
        progress=False,
    )
    return out


def test_analyze_writes_json_and_png(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    options = "--num-images 20 --probes 4 --power-iters 30 --lanczos-iters 12 --slq-probes 2"
    argv = ["analyze", str(digits_checkpoint), "--out", str(out), *options.split()]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "curvature.json").read_text())
    assert printed["lambda_max"] == report["lambda_max"]
    assert report["image_source"] == "clean_indices"
    assert report["num_images"] == 20
    stored = json.loads((digits_checkpoint / "metadata.json").read_text())["clean_indices"]
    assert set(report["image_indices"]) <= set(stored)
    for key in ("lambda_max", "trace_hessian", "trace_empirical_fisher", "trace_ggn"):
        assert np.isfinite(report[key]), key
    assert report["trace_empirical_fisher"] > 0 and report["trace_ggn"] > 0
    top = report["top_eigenvalues"]
    assert len(top) == 5 and top == sorted(top, reverse=True)
    # Power iteration and Lanczos agree on the top of the spectrum.
    assert report["lambda_max"] == pytest.approx(top[0], rel=0.05)
    assert all(abs(sum(w) - 1) < 1e-4 for w in report["density"]["weights"])
    for key in ("git_revision", "machine", "date", "command"):
        assert key in report
    with Image.open(out / "spectral_density.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_several_checkpoints_are_analysed_in_one_process(digits_checkpoint, tmp_path, capsys):
    """Each writes its report into --out/NAME and prints its own line; a copy of a checkpoint
    gets the same numbers as the original (same weights, images and seed)."""
    copy = tmp_path / "copy"
    shutil.copytree(digits_checkpoint, copy)
    out = tmp_path / "analyses"
    options = "--num-images 10 --probes 2 --power-iters 10 --lanczos-iters 6 --slq-probes 1"
    argv = ["analyze", str(digits_checkpoint), str(copy), "--out", str(out), *options.split()]
    assert cli.main(argv) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [p["out"] for p in printed] == [
        str((out / digits_checkpoint.name).resolve()), str((out / "copy").resolve())
    ]  # fmt: skip
    reports = [json.loads((pathlib.Path(p["out"]) / "curvature.json").read_text()) for p in printed]
    assert reports[1]["checkpoint"] == str(copy.resolve())
    for key in ("lambda_max", "trace_hessian", "trace_empirical_fisher", "top_eigenvalues"):
        assert reports[0][key] == pytest.approx(reports[1][key], rel=1e-5), key


def test_several_checkpoints_with_one_name_are_refused_before_any_work(
    digits_checkpoint, tmp_path, capsys
):
    other = tmp_path / "elsewhere" / digits_checkpoint.name
    shutil.copytree(digits_checkpoint, other)
    argv = ["analyze", str(digits_checkpoint), str(other), "--out", str(tmp_path / "a")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "names must differ" in err and digits_checkpoint.name in err and "\n" not in err
    assert not (tmp_path / "a").exists()


def test_analyze_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fippure: error:") and "\n" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--probes", "0"], "argument --probes: must be >= 1, got 0"),
        (["--num-images", "-5"], "argument --num-images: must be >= 1, got -5"),
        (["--top-k", "two"], "argument --top-k: expected an integer, got 'two'"),
        (["--seed", "-1"], "argument --seed: must lie in [0, 2**32), got -1"),
    ],
)
def test_analyze_refuses_a_bad_count_under_its_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_analyze_refuses_an_output_it_would_damage(digits_checkpoint, tmp_path, capsys):
    """A file, or a directory holding a checkpoint (the source itself here), is refused
    before any work; the error is one line."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, message in (
        (afile, "is a file"),
        (digits_checkpoint, "holds a checkpoint or another run's output"),
    ):
        assert cli.main(["analyze", str(digits_checkpoint), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_analyze_json_is_strict_and_a_capped_image_count_is_noted(
    digits_checkpoint, tmp_path, capsys
):
    """One probe has no standard error (null, not a bare NaN); asking for more images than the
    stored clean set (30) says so."""
    out = tmp_path / "analysis"
    options = "--num-images 40 --probes 1 --power-iters 3 --lanczos-iters 4 --slq-probes 1"
    options += " --top-k 2"
    assert cli.main(["analyze", str(digits_checkpoint), "--out", str(out), *options.split()]) == 0
    assert "holds 30 images; using them all (--num-images asked for 40)" in capsys.readouterr().err
    text = (out / "curvature.json").read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert report["num_images"] == 30


def test_analyze_refuses_a_checkpoint_made_for_other_images_in_one_line(tmp_path, capsys):
    # its model then failed deep inside Flax with a traceback
    import jax

    from fippure.checkpoints import model_metadata, save_checkpoint
    from fippure.models import create_model, init_variables

    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    metadata = {
        "model": model_metadata("small_cnn", 10, width=4),
        "dataset": "digits",
        "image_shape": [32, 32, 3],
        "clean_indices": list(range(50)),
    }
    path = save_checkpoint(tmp_path / "cifar_shaped", variables, metadata)
    assert cli.main(["analyze", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "was made for (32, 32, 3) images, but digits has (8, 8, 1)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
