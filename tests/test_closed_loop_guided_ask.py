"""Guided Ask: the twin computes only the outputs the session's objective reads (a pruned graph, cached per
(model, version, outputs)), scores candidates rendered at the generator's resolution, and presents the
ones the full twin would rank highest. Real ONNX Runtime, real torch generator, real SQLite journal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from neurotwin.engines.closed_loop import ClosedLoopEngine, SessionRequest, ToldResponse
from neurotwin.engines.journal import SqliteJournal
from neurotwin.imagecodec import decode_image
from neurotwin.runtimes.generators import DCGANGenerator, save_generator
from neurotwin.store import GENERATORS, ModelStore

from tests._models import make_card, write_predictor
from tests._onnx_graphs import export_nhwc
from tests.test_onnx_torch_pruning import SIZE, PerNeuronTwin

GENERATOR = "tiny-gan"
TWIN = "per-neuron"
NEURONS = 7
POPULATION = 5


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A tiny DCGAN (16 px) and a twin with one small network per neuron (24 px input)."""
    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(3)
    with ModelStore(root).new_version(GENERATORS, GENERATOR) as folder:
        save_generator(DCGANGenerator(latent_dim=8, resolution=16, width=8), folder, GENERATOR)
    path = export_nhwc(PerNeuronTwin(NEURONS), SIZE, root / "per_neuron.onnx")
    write_predictor(root, TWIN, path.read_bytes(), make_card(TWIN, NEURONS, SIZE, None, seed=3))
    return ModelStore(root)


def test_pruned_twin_matches_the_full_twin_on_its_outputs(store: ModelStore, tmp_path: Path) -> None:
    engine = _engine(store, tmp_path / "journal.sqlite3")
    try:
        images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
        full = engine.models.twin(TWIN, 1).predict(images)
        pruned_twin = engine.models.twin(TWIN, 1, (5, 2))
        pruned = pruned_twin.predict(images)
        assert pruned.shape == full.shape == (12, NEURONS)
        np.testing.assert_allclose(pruned[:, [2, 5]], full[:, [2, 5]], rtol=1e-5, atol=1e-6)
        assert np.isnan(np.delete(pruned, [2, 5], axis=1)).all()
        # The pruned graph computes two of the seven sub-networks.
        assert pruned_twin.pruned is not None and pruned_twin.pruned.neurons == 2
    finally:
        engine.shutdown()
        engine.journal.close()


def _engine(store: ModelStore, path: Path) -> ClosedLoopEngine:
    return ClosedLoopEngine(store, SqliteJournal(path), default_generator=GENERATOR, twin_threads=1)


def _request(session_id: str, **kwargs: object) -> SessionRequest:
    options: dict[str, object] = {
        "session_id": session_id,
        "neuron_count": NEURONS,
        "target_neurons": [4],
        "population_size": POPULATION,
        "seed": 9,
        "twin": TWIN,
        "candidates_per_presentation": 6,
    }
    options.update(kwargs)
    return SessionRequest(**options)  # type: ignore[arg-type]


def test_guided_ask_scores_with_the_pruned_twin_and_presents_the_full_twins_top(
    store: ModelStore, tmp_path: Path
) -> None:
    engine = _engine(store, tmp_path / "journal.sqlite3")
    full_twin = engine.models.twin(TWIN, 1)
    try:
        engine.create_session(_request("pruned"))
        engine.create_session(_request("refit", refit_readout=True))
        for _ in range(2):
            gen = engine.ask("pruned")
            # What the rig gets: predictions for the target, from the pruned twin, equal to the full twin's.
            shown = np.stack([decode_image(s.image) for s in gen.stimuli])
            expected = full_twin.predict(shown)[:, 4]
            got = np.array([s.predicted_rates[0] for s in gen.stimuli])
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
            # They are the population the full twin ranks highest among all candidates.
            live = engine._get_live("pruned")
            assert live.pending is not None
            latents = np.stack([s.latent for s in live.pending.stimuli])
            assert len(latents) == POPULATION and live.pending.generation.meta["candidates"] == 30
            stored = live.pending.stimuli[0].predicted
            assert stored is not None and np.isfinite(stored[4]) and np.isnan(np.delete(stored, 4)).all()
            rng = np.random.default_rng(gen.generation)
            engine.tell(
                "pruned",
                gen.generation,
                [ToldResponse(s.stimulus_id, rates=list(rng.random(NEURONS))) for s in gen.stimuli],
            )
        refit = engine.ask("refit")
        assert len(refit.stimuli) == POPULATION
        # One twin per (model, version, outputs): the pruned one for the mean objective, the whole one
        # for the refit readout (it reads every output).
        keys = set(engine.models._twins)
        assert (TWIN, 1, (4,)) in keys and (TWIN, 1, None) in keys
        assert engine.models.twin(TWIN, 1, (4,)) is engine.models.twin(TWIN, 1, (4,))
    finally:
        engine.shutdown()
        engine.journal.close()


def test_guided_choice_is_the_full_twins_top(store: ModelStore, tmp_path: Path) -> None:
    """Re-render the journaled generation's candidates (the optimizer is deterministic) and rank them
    with the unpruned twin: the presented latents are exactly its top population."""
    from neurotwin.engines.closed_loop.driver import OptimizerDriver, latent_prior
    from neurotwin.engines.closed_loop.settings import SessionConfig
    from neurotwin.engines.render import render_stimuli

    engine = _engine(store, tmp_path / "journal.sqlite3")
    try:
        engine.create_session(_request("s"))
        gen = engine.ask("s")
        live = engine._get_live("s")
        assert live.pending is not None
        config = SessionConfig.from_dict(live.record.config)
        driver = OptimizerDriver(config, latent_prior(live.generator))
        driver.load(engine.journal.optimizer_state("s"))
        candidates = driver.propose(config.candidates)
        rates = engine.models.twin(TWIN, 1).predict(render_stimuli(live.generator, candidates, SIZE))[:, 4]
        top = np.sort(np.argsort(-rates, kind="stable")[:POPULATION])
        presented = {tuple(s.latent) for s in live.pending.stimuli}
        assert presented == {tuple(candidates[i]) for i in top}
        assert len(gen.stimuli) == POPULATION
    finally:
        engine.shutdown()
        engine.journal.close()
