"""Synthesis objectives: what a stimulus should do to the twin's neurons, as a score per image.

Every objective maps ``(rates [B, K], images [B, 3, H, W], groups [B] or None)`` to a score per image
``[B]`` (higher is better), differentiable in both inputs. ``groups`` says which images belong to the
same request, for terms that compare images with each other (diversity); None means one group.

A twin ensemble gives member rates ``[B, M, K]`` instead of ``[B, K]``. Objectives score the members'
mean unless they read the members themselves: :class:`Agreement` scores its inner objective on every
member and combines the members' scores (mean, soft-min, min) minus a penalty on their spread, so an
image has to drive every member, not exploit one (Walker et al. 2019 and Bashivan et al. 2019 synthesize
against ensembles for the same reason).

Objectives compose like numbers: ``neuron(3) + 0.1 * diversity()``, ``2 * a - b``. The gRPC layer
builds them from plain data with :func:`build_objective` (an :class:`ObjectiveSpec` or a dict), and
:meth:`Objective.to_spec` goes back, so a request can be journaled and replayed.

Measured responses are scored by the same algebra without gradients: :meth:`Objective.score_array`
takes float64 numpy rates, and :func:`response_objective` builds a closed-loop session's objective
(``"mean"`` or ``"contrast"``) from its target neurons. torch is imported only where a term needs it,
so reading journaled sessions (exports, reports) does not load it.

Modules: ``algebra`` (base class, sums, multiples), ``terms`` (the leaf objectives), ``spec_data``
and ``specs`` (plain data, building objectives from it) and ``responses`` (measured responses, numpy).
"""

from neurotwin.engines.objectives.algebra import Objective, Scaled, Sum
from neurotwin.engines.objectives.responses import RESPONSE_OBJECTIVES, objective_scores, response_objective
from neurotwin.engines.objectives.spec_data import ObjectiveSpec
from neurotwin.engines.objectives.specs import KINDS, build_objective, resolve_neurons
from neurotwin.engines.objectives.terms import (
    AGGREGATES,
    DIVERSITY_SPACES,
    Agreement,
    Diversity,
    Neuron,
    OneHotPopulation,
    Population,
    agreement,
    diversity,
    neuron,
    one_hot_population,
    population,
)

__all__ = [
    "AGGREGATES",
    "DIVERSITY_SPACES",
    "KINDS",
    "RESPONSE_OBJECTIVES",
    "Agreement",
    "Diversity",
    "Neuron",
    "Objective",
    "ObjectiveSpec",
    "OneHotPopulation",
    "Population",
    "Scaled",
    "Sum",
    "agreement",
    "build_objective",
    "diversity",
    "neuron",
    "objective_scores",
    "one_hot_population",
    "population",
    "resolve_neurons",
    "response_objective",
]
