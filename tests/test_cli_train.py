"""The store commands end to end through ``neurotwin.cli.main``: train, evaluate, register, models."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import h5py
import pytest
from neurotwin.cli import main
from neurotwin.store import PREDICTORS, ModelStore, validate_predictor
from neurotwin.training.datasets import load_recording

from tests._recordings import write_session_layout
from tests.test_export_store import foreign_onnx, write_images
from tests.test_twin import planted_recording

TINY = [
    "--stages",
    "1",
    "--input-size",
    "32",
    "--hidden",
    "12",
    "--core-layers",
    "1",
    "--epochs",
    "25",
    "--patience",
    "5",
]


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `neurotwin train` writes reports/ under the working directory by default.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def planted_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A planted recording with 4 repeats per image, as HDF5 (NaN-free)."""
    rec = planted_recording(n=160, seed=2, repeats=4)
    path = tmp_path_factory.mktemp("data") / "planted.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("images", data=rec.images)
        fh.create_dataset("responses", data=rec.repeats)
    return path


@pytest.fixture(scope="module")
def trained(planted_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(store root, report folder, stdout) of one `neurotwin train` run, shared by several tests."""
    base = tmp_path_factory.mktemp("train")
    store, report = base / "model_store", base / "report"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        out = str(store / "predictors" / "planted")
        args = ["train", str(planted_h5), "--out", out, "--report", str(report), *TINY, "--seed", "1"]
        code = main([*args, "--device", "cpu"])
    assert code == 0, buffer.getvalue()
    return store, report, buffer.getvalue()


def test_train_registers_an_evaluated_twin(trained: tuple[Path, Path, str], planted_h5: Path) -> None:
    store_root, report, out = trained
    assert "median r" in out and "model.onnx" in out and "report" in out
    version = ModelStore(store_root).resolve(PREDICTORS, "planted")
    assert version.version == 1
    card = validate_predictor(version)
    recording = load_recording(planted_h5)
    assert card.training["sha256"] == recording.sha256
    split = card.training["split"]
    assert split["scheme"] == "random" and split["seed"] == 1
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(160))
    assert card.training["config"]["stages"] == [1]
    test = card.metrics["test"]
    assert test["images"] == len(split["test"]) and len(test["per_neuron_r"]) == 3
    assert test["median_r"] > 0.4, "planted LN neurons are learned well above chance"
    assert test["median_noise_ceiling"] is not None and test["median_feve"] is not None
    stats = card.neuron_stats
    assert stats is not None and stats.image_count == len(split["train"])
    assert stats.measured_max is not None and len(stats.predicted_p99) == 3
    for name in ("index.html", "scatter_best.png", "scatter_median.png", "r_histogram.png"):
        assert (report / name).is_file()


def test_evaluate_reproduces_the_card_through_onnx_runtime(
    trained: tuple[Path, Path, str], planted_h5: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store_root, _, _ = trained
    card = validate_predictor(ModelStore(store_root).resolve(PREDICTORS, "planted"))
    code = main(
        ["evaluate", "planted", str(planted_h5), "--store", str(store_root), "--part", "test", "--json"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["median_r"] == pytest.approx(card.metrics["test"]["median_r"], abs=1e-4)
    folder = store_root / "predictors" / "planted"
    assert main(["evaluate", str(folder), str(planted_h5), "--report", str(tmp_path / "r")]) == 0
    assert "all: 160 images" in capsys.readouterr().out
    assert (tmp_path / "r" / "index.html").is_file()


def test_evaluate_refuses_mismatched_recordings(
    trained: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_root, _, _ = trained
    other = write_session_layout(tmp_path, sessions=("s1",), n_images=12, n_neurons=5, size=32)
    code = main(["evaluate", "planted", str(other), "--store", str(store_root)])
    assert code == 1
    assert "has 5 neurons but predictors/planted/1 predicts 3" in capsys.readouterr().err
    assert main(["evaluate", "absent", str(other), "--store", str(store_root)]) == 1
    assert "no predictor named 'absent'" in capsys.readouterr().err


def test_train_with_helper_sessions_and_several_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_session_layout(tmp_path, sessions=("a", "b", "c"), n_images=30, n_neurons=3, size=32)
    store = tmp_path / "store"
    args = [
        "--epochs",
        "2",
        "--stages",
        "1",
        "--input-size",
        "32",
        "--hidden",
        "4",
        "--core-layers",
        "1",
        "--report",
        "none",
    ]
    code = main(
        [
            "train",
            str(root),
            "--session",
            "a",
            "--helper-session",
            "all",
            "--out",
            "tw",
            "--store",
            str(store),
            *args,
        ]
    )
    assert code == 0, capsys.readouterr().err
    card = validate_predictor(ModelStore(store).resolve(PREDICTORS, "tw"))
    assert [h["name"] for h in card.training["helpers"]] == ["b", "c"]
    assert card.neuron_ids == ["a_0", "a_1", "a_2"]
    core = tmp_path / "core.pt"
    code = main(
        [
            "train",
            str(root),
            "--session",
            "all",
            "--out",
            f"{store}/predictors/multi",
            "--save-core",
            str(core),
            *args,
        ]
    )
    assert code == 0 and core.is_file()
    assert ModelStore(store).names(PREDICTORS) == ["multi-a", "multi-b", "multi-c", "tw"]
    co_trained = validate_predictor(ModelStore(store).resolve(PREDICTORS, "multi-b")).training["co_trained"]
    assert co_trained == ["a", "c"]
    # A new session reuses the saved core: only its readout trains.
    reuse = ["--core-from", str(core), "--out", "reuse", "--store", str(store), "--report", "none"]
    code = main(["train", str(root), "--session", "c", *reuse])
    assert code == 0, capsys.readouterr().err
    card = validate_predictor(ModelStore(store).resolve(PREDICTORS, "reuse"))
    assert card.training["core_from"]["sessions"] == ["a", "b", "c"]
    assert card.training["config"]["stages"] == [1], "the architecture comes from the saved core"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "halves"], "--split 'halves'"),
        (["--stages", "x"], "--stages 'x'"),
        (
            ["--core", "conv", "--readout", "factorized", "--input-size", "8"],
            "input_size must be at least 16",
        ),
    ],
)
def test_train_argument_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    root = write_session_layout(tmp_path, sessions=("a",), n_images=12, n_neurons=2, size=16)
    code = main(["train", str(root), "--out", f"{tmp_path}/store/predictors/x", *extra])
    assert code == 1
    assert message in capsys.readouterr().err


def test_train_out_must_name_a_predictors_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_session_layout(tmp_path, sessions=("a",), n_images=12, n_neurons=2, size=16)
    assert main(["train", str(root), "--out", f"{tmp_path}/store/generators/x"]) == 1
    assert "expected <store>/predictors/<name>" in capsys.readouterr().err


def test_register_and_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = foreign_onnx(tmp_path / "foreign.onnx")
    refs = write_images(tmp_path / "refs", 4, size=24)
    store = tmp_path / "store"
    code = main(
        [
            "register",
            str(model),
            "--name",
            "lab",
            "--store",
            str(store),
            "--images",
            str(refs),
            "--neuron-ids",
            "a,b,c,d,e",
        ]
    )
    assert code == 0
    assert "registered" in capsys.readouterr().out
    assert validate_predictor(ModelStore(store).resolve(PREDICTORS, "lab")).neuron_ids == list("abcde")
    # A broken version is listed as such, not hidden and not fatal.
    (store / "predictors" / "lab" / "2").mkdir()
    assert main(["models", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "lab/1  neurons 5  input 24x24" in out and "lab/2  BROKEN" in out
    assert main(["models", "--store", str(store), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert [(r["name"], r["version"]) for r in rows] == [("lab", 1), ("lab", 2)]
    assert main(["register", str(model), "--name", "lab", "--store", str(store), "--neuron-ids", "a,b"]) == 1
    assert "2 neuron ids given for a model with 5" in capsys.readouterr().err


def test_models_uses_the_environment_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NEUROTWIN_MODEL_STORE", str(tmp_path / "empty"))
    # A store that does not exist is a mistake to report; an existing empty one is listed as empty.
    assert main(["models"]) == 1
    assert f"model store {tmp_path / 'empty'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "empty") in out and "(empty)" in out
