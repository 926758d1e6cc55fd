"""Ensemble twins: one ONNX graph with the members' mean (``rates``) and every member's rates
(``member_rates``), from training through export, the store, serving and the differentiable twin."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from neurotwin.card import MEMBER_OUTPUT, PredictorCard
from neurotwin.cli import main
from neurotwin.errors import InvalidInput, ModelStoreError
from neurotwin.runtimes.onnx_session import PredictorSession, SessionSettings
from neurotwin.runtimes.onnx_torch import (
    check_parity,
    convert_onnx,
    load_differentiable_twin,
    prune_outputs,
    select_outputs,
)
from neurotwin.store import PREDICTORS, ModelStore, validate_predictor
from neurotwin.training.datasets import split_indices
from neurotwin.training.ensemble import fit_cv_ensemble, member_split
from neurotwin.training.export import ParityError, build_card, export_onnx, export_twin, parity_check
from neurotwin.training.fit import SessionData, fit_twins

from tests.test_cli_train import TINY
from tests.test_export_store import SIZE, images, tiny_twin

MEMBERS = 3
NEURONS = 4


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, PredictorCard]:
    """(torch twin, stored version, card) of a 3-member Gaussian-readout ensemble."""
    twin = tiny_twin("gaussian", neurons=NEURONS, ensemble=MEMBERS)
    store = ModelStore(tmp_path_factory.mktemp("store"))
    version, card = export_twin(
        twin,
        store=store,
        name="ens",
        neuron_ids=[f"n{k}" for k in range(NEURONS)],
        image_size=(SIZE, SIZE),
        parity_images=images(6, seed=1),
        stats_images=images(12, seed=2),
        stats_measured=None,
        training={"seed": 0},
        metrics={},
    )
    return twin, version, card


def test_the_graph_returns_the_mean_and_every_member(ensemble: tuple) -> None:
    twin, version, card = ensemble
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["rates", MEMBER_OUTPUT]
    batch = images(5, seed=7)
    rates, members = session.run(None, {"images": batch})
    assert rates.shape == (5, NEURONS) and members.shape == (5, MEMBERS, NEURONS)
    np.testing.assert_allclose(rates, members.mean(axis=1), rtol=1e-5, atol=1e-6)
    torch_members = twin.predict(batch, members=True)
    for member in range(MEMBERS):
        # Each member is its own head: its rates are the head's, not a copy of the mean.
        expected = twin.heads[member](twin.features(torch.from_numpy(batch))).detach().numpy()
        np.testing.assert_allclose(members[:, member], expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(torch_members[:, member], expected, rtol=1e-6, atol=1e-6)
    assert np.abs(members[:, 0] - members[:, 1]).max() > 1e-3, "members differ (own seeds)"
    # Card: the members are listed, the parity of each was checked, statistics are of the mean.
    assert card.output.members == MEMBERS and card.output.member_output == MEMBER_OUTPUT
    assert card.output.graph_outputs == ["rates", MEMBER_OUTPUT]
    parity = card.training["parity"]
    assert parity["members"] == MEMBERS and len(parity["member_max_abs_diff"]) == MEMBERS
    assert max(parity["member_max_abs_diff"]) <= parity["tolerance"]
    stats_rates = session.run(["rates"], {"images": images(12, seed=2)})[0]
    np.testing.assert_allclose(card.neuron_stats.predicted_max, stats_rates.max(0), atol=1e-4)
    assert validate_predictor(version).to_dict() == card.to_dict()


def test_parity_names_the_member_that_differs(ensemble: tuple) -> None:
    twin, version, _ = ensemble
    model_bytes = version.model_path.read_bytes()
    assert parity_check(twin, model_bytes, images(3))["members"] == MEMBERS
    changed = tiny_twin("gaussian", neurons=NEURONS, ensemble=MEMBERS)
    with torch.no_grad():
        changed.heads[2].readout.bias.add_(0.5)
    with pytest.raises(ParityError, match=r"differs from torch by .* in rates "):
        parity_check(changed, model_bytes, images(3))
    # Members 1 and 2 swapped: the mean agrees, so only the member comparison can catch it.
    swapped = tiny_twin("gaussian", neurons=NEURONS, ensemble=MEMBERS)
    swapped.heads = torch.nn.ModuleList([swapped.heads[0], swapped.heads[2], swapped.heads[1]])
    with pytest.raises(ParityError, match="member_rates of member 1"):
        parity_check(swapped, model_bytes, images(3))


def test_predictor_session_serves_the_rates_by_name(ensemble: tuple) -> None:
    _, version, card = ensemble
    session = PredictorSession(version.model_path, card, SessionSettings(device="cpu"))
    batch = images(4, seed=9)
    expected = ort.InferenceSession(str(version.model_path)).run(["rates"], {"images": batch})[0]
    np.testing.assert_allclose(session.run(batch), expected, rtol=1e-6)


def test_store_refuses_cards_that_do_not_match_the_outputs(ensemble: tuple, tmp_path: Path) -> None:
    _, version, card = ensemble
    model_bytes = version.model_path.read_bytes()

    def stored(edit: dict) -> object:
        data = card.to_dict()
        data["output"] = {**data["output"], **edit}
        folder = tmp_path / PREDICTORS / f"x{len(list(tmp_path.rglob('card.json')))}" / "1"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(model_bytes)
        PredictorCard.from_dict(data).save(folder / "card.json")
        return ModelStore(tmp_path).resolve(PREDICTORS, folder.parent.name)

    with pytest.raises(ModelStoreError, match="graph outputs"):
        validate_predictor(stored({"members": 1, "member_output": None}))
    with pytest.raises(ModelStoreError, match="holds 3 members, the card says 2"):
        validate_predictor(stored({"members": 2}))
    with pytest.raises(ModelStoreError, match="graph outputs"):
        validate_predictor(stored({"member_output": "members"}))
    with pytest.raises(ModelStoreError, match="members must be at least 1"):
        stored({"members": 0})


def test_single_member_twins_keep_one_output() -> None:
    twin = tiny_twin("factorized")
    model = onnx.load_from_string(export_onnx(twin))
    assert [o.name for o in model.graph.output] == ["rates"]
    card = build_card(
        name="t", neuron_ids=list("abcd"), image_size=(SIZE, SIZE), training={}, metrics={}, stats=None
    )
    assert card.output.members == 1 and card.output.graph_outputs == ["rates"]


# -- the differentiable twin ---------------------------------------------------------------------------


def test_differentiable_twin_returns_the_rates_unless_asked_for_members(ensemble: tuple) -> None:
    twin, version, _ = ensemble
    batch = images(3, seed=11)
    x = torch.from_numpy(batch).float()
    module, _ = load_differentiable_twin(version, "cpu", parity_images=2)
    assert module.output_names == ["rates"]
    rates = module(x)
    np.testing.assert_allclose(rates.detach().numpy(), twin.predict(batch), rtol=1e-4, atol=1e-4)
    both, _ = load_differentiable_twin(version, "cpu", parity_images=2, output_names=["rates", MEMBER_OUTPUT])
    got_rates, got_members = both(x.requires_grad_(True))
    assert got_members.shape == (3, MEMBERS, NEURONS)
    np.testing.assert_allclose(got_rates.detach().numpy(), rates.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        got_members.detach().numpy(), twin.predict(batch, members=True), rtol=1e-4, atol=1e-4
    )
    # An agreement objective: the gradient of one member's rate reaches the image.
    got_members[:, 1, 2].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    members_only, _ = load_differentiable_twin(version, parity_images=2, output_names=[MEMBER_OUTPUT])
    assert members_only(torch.from_numpy(batch).float()).shape == (3, MEMBERS, NEURONS)
    for names, message in [(["members"], "outputs are"), ([], "at least one"), (["rates", "rates"], "once")]:
        with pytest.raises(InvalidInput, match=message):
            load_differentiable_twin(version, parity_images=0, output_names=names)


def test_selecting_the_rates_keeps_what_the_mean_needs(ensemble: tuple) -> None:
    _, version, _ = ensemble
    model = onnx.load(str(version.model_path))
    rates_only = select_outputs(model, ["rates"])
    assert [o.name for o in rates_only.graph.output] == ["rates"]
    assert [o.name for o in model.graph.output] == ["rates", MEMBER_OUTPUT], "the given model is unchanged"
    onnx.checker.check_model(rates_only)
    batch = images(2)
    expected = ort.InferenceSession(str(version.model_path)).run(["rates"], {"images": batch})[0]
    got = ort.InferenceSession(rates_only.SerializeToString()).run(None, {"images": batch})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("kept", [[2], [3, 0], [0, 1, 2, 3]])
def test_pruning_cuts_both_outputs_to_the_same_neurons(ensemble: tuple, kept: list[int]) -> None:
    _, version, _ = ensemble
    model = onnx.load(str(version.model_path))
    pruned = prune_outputs(model, kept)
    assert pruned.outputs == tuple(kept)
    assert [o.name for o in pruned.model.graph.output] == ["rates", MEMBER_OUTPUT]
    batch = images(3, seed=5)
    full = ort.InferenceSession(str(version.model_path)).run(None, {"images": batch})
    cut = ort.InferenceSession(pruned.model.SerializeToString()).run(None, {"images": batch})
    np.testing.assert_allclose(cut[0], full[0][:, kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cut[1], full[1][:, :, kept], rtol=1e-5, atol=1e-6)
    if len(kept) < NEURONS:
        assert pruned.parameters_after < pruned.parameters_before
    module = convert_onnx(pruned.model)
    module.kept_outputs = pruned.outputs
    report = check_parity(version.model_path, module, n=3, height=SIZE, width=SIZE, outputs=kept)
    assert set(report.per_output) == {"rates", MEMBER_OUTPUT}


def test_pruned_loading_of_chosen_outputs(ensemble: tuple) -> None:
    twin, version, _ = ensemble
    module, _ = load_differentiable_twin(
        version, "cpu", parity_images=2, outputs=[1, 3], output_names=[MEMBER_OUTPUT, "rates"]
    )
    assert module.kept_outputs == (1, 3) and module.output_names == [MEMBER_OUTPUT, "rates"]
    batch = images(2, seed=3)
    members, rates = module(torch.from_numpy(batch).float())
    np.testing.assert_allclose(rates.detach().numpy(), twin.predict(batch)[:, [1, 3]], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        members.detach().numpy(), twin.predict(batch, members=True)[:, :, [1, 3]], rtol=1e-4, atol=1e-4
    )


def test_parity_checks_every_output_by_name(ensemble: tuple, tmp_path: Path) -> None:
    _, version, _ = ensemble
    other = tiny_twin("gaussian", neurons=NEURONS, ensemble=MEMBERS, seed=4)
    path = tmp_path / "other.onnx"
    path.write_bytes(export_onnx(other))
    members_only = convert_onnx(select_outputs(onnx.load(str(path)), [MEMBER_OUTPUT]))
    with pytest.raises(ModelStoreError, match="member_rates"):
        check_parity(version.model_path, members_only, n=2, height=SIZE, width=SIZE)


# -- cross-validated members ---------------------------------------------------------------------------


def test_member_splits_hold_out_disjoint_slices() -> None:
    split = split_indices(100, scheme="first-half", seed=0, val_fraction=0.1)
    pool = set(split["train"]) | set(split["val"])
    held = []
    for member in range(4):
        part = member_split(split, member, seed=0)
        np.testing.assert_array_equal(part["test"], split["test"])
        assert set(part["train"]) | set(part["val"]) == pool and not set(part["train"]) & set(part["val"])
        assert part["val"].size == split["val"].size
        held.append(set(part["val"]))
    assert all(not a & b for i, a in enumerate(held) for b in held[i + 1 :])
    np.testing.assert_array_equal(
        member_split(split, 2, seed=0)["val"], member_split(split, 2, seed=0)["val"]
    )
    with pytest.raises(InvalidInput, match="validation images"):
        member_split({**split, "val": np.zeros(0, np.int64)}, 0, seed=0)


def test_cv_ensemble_members_are_the_fits_of_their_own_splits() -> None:
    from tests.test_twin import FAST, TINY_EFFNET, planted_recording

    rec = planted_recording(n=120, seed=4)
    split = split_indices(rec.n_images, scheme="random", seed=0, val_fraction=0.15)
    config = dataclasses.replace(TINY_EFFNET, ensemble=2)
    fit = dataclasses.replace(FAST, max_epochs=8, seed=5)
    result, held = fit_cv_ensemble({"s": SessionData(rec, split)}, config, fit)
    twin = result.twins["s"]
    assert twin.members == 2 and result.config.ensemble == 2
    assert [sorted(v) for v in held["s"]] == [member_split(split, m, 5)["val"].tolist() for m in range(2)]
    batch = rec.images[split["test"]]
    members = twin.predict(batch, members=True)
    np.testing.assert_allclose(twin.predict(batch), members.mean(axis=1), rtol=1e-5, atol=1e-6)
    for member in range(2):
        alone = fit_twins(
            {"s": SessionData(rec, member_split(split, member, 5))},
            TINY_EFFNET,
            dataclasses.replace(fit, seed=5 + member),
        ).twins["s"]
        np.testing.assert_allclose(members[:, member], alone.predict(batch), rtol=1e-5, atol=1e-5)
    assert np.abs(members[:, 0] - members[:, 1]).max() > 1e-3


# -- neurotwin train --ensemble ------------------------------------------------------------------------


def test_train_ensemble_exports_members(
    planted_h5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "model_store" / "predictors" / "ens")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["train", str(planted_h5), "--out", out, *TINY, "--ensemble", "2", "--device", "cpu"])
    assert code == 0, buffer.getvalue()
    version = ModelStore(tmp_path / "model_store").resolve(PREDICTORS, "ens")
    card = validate_predictor(version)
    assert card.output.members == 2 and card.training["config"]["ensemble"] == 2
    # Cross-validated by default: each member held out its own validation slice of train + val.
    split = card.training["split"]
    assert card.training["member_split"] == "folds" and len(split["member_val"]) == 2
    first, second = (set(v) for v in split["member_val"])
    assert len(first) == len(second) == len(split["val"]) and not first & second
    assert first | second <= set(split["train"]) | set(split["val"])
    assert len(card.training["parity"]["member_max_abs_diff"]) == 2
    session = ort.InferenceSession(str(version.model_path))
    rates, members = session.run(None, {"images": images(2, size=card.input.height)})
    assert members.shape == (2, 2, 3)
    np.testing.assert_allclose(rates, members.mean(axis=1), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def planted_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import h5py

    from tests.test_twin import planted_recording

    rec = planted_recording(n=120, seed=3)
    path = tmp_path_factory.mktemp("data") / "planted.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("images", data=rec.images)
        fh.create_dataset("responses", data=rec.responses)
    return path
