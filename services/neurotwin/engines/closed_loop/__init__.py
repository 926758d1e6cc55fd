"""Closed-loop sessions: evolve images against responses a rig records, durably, optionally twin-guided.

One session = one optimizer (CMA-ES or a GA) over a generator's latent space. The rig asks for the
pending generation, shows its images (synthetic ones interleaved with natural reference images) and
tells the responses. Rules:

- Ask is idempotent: the pending generation is created once, journaled, and returned until told.
- Tell is idempotent per (generation, stimulus): the same values again change nothing; different
  values for a told stimulus, a stale or not-yet-asked generation, or (unless ``partial``) a Tell that
  leaves stimuli of the generation without responses fail with FAILED_PRECONDITION naming what is off.
  Non-finite values and wrong lengths fail with INVALID_ARGUMENT, and nothing is stored.
- Durable: everything is journaled before a call returns (``neurotwin.engines.journal``). A process
  restarted on the same journal reloads each session from it: the optimizer state after the last
  completed generation, the pending generation's stimuli exactly as sent, and its responses so far.
  The optimizer is deterministic given its state, so re-asking it must reproduce the journaled
  latents; this is checked on load.
- With a twin attached, each generation samples ``candidates_per_presentation`` times more latents
  than it shows and presents those the twin ranks highest; with ``refit_readout`` the ranking comes
  from a ridge readout refit on this session's own measurements once it predicts them better than
  the twin alone (judged by leave-one-out correlation).

Modules, one job each: ``settings`` (request, checks, journaled config), ``views`` (what the data
plane returns), ``stimuli`` (rendering, natural images, encoding), ``presentation`` (what a
generation shows, in what order), ``driver`` (the optimizer), ``guidance`` (twin and refit
readout), ``responses`` (checking a Tell), ``scoring`` (objective, best so far, summary),
``models`` (loaded generators and twins), ``state`` (a session in memory) and ``engine``.
"""

from neurotwin.engines.closed_loop.engine import ClosedLoopEngine
from neurotwin.engines.closed_loop.guidance import Readout, Twin, fit_readout
from neurotwin.engines.closed_loop.settings import (
    IMAGE_FORMATS,
    OBJECTIVES,
    OPTIMIZERS,
    SessionConfig,
    SessionRequest,
)
from neurotwin.engines.closed_loop.stimuli import (
    IMAGE_SUFFIXES,
    natural_entries,
    natural_image_bytes,
    prepare_natural_images,
)
from neurotwin.engines.closed_loop.views import (
    Generation,
    SessionView,
    Stimulus,
    TellResult,
    ToldResponse,
    empty_best,
)
from neurotwin.engines.objectives import objective_scores
from neurotwin.imagecodec import encode_png_fast, resize_batch

__all__ = [
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "OBJECTIVES",
    "OPTIMIZERS",
    "ClosedLoopEngine",
    "Generation",
    "Readout",
    "SessionConfig",
    "SessionRequest",
    "SessionView",
    "Stimulus",
    "TellResult",
    "ToldResponse",
    "Twin",
    "empty_best",
    "encode_png_fast",
    "fit_readout",
    "natural_entries",
    "natural_image_bytes",
    "objective_scores",
    "prepare_natural_images",
    "resize_batch",
]
