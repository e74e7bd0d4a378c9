"""The ghost engine: exact per-sample gradient norms from one forward and one activation backward.

How it works (math in ``docs/norm-math.md``):

1. Every module that owns a selected parameter and has a norm rule (or a module-level fallback) gets a
   forward hook for the scored forward only (registered per call, removed after, nothing stored on the
   module). The hook records the module's input and routes its output through an identity autograd node,
   a *tap*, tied to a scalar anchor.
2. ``torch.autograd.grad(Σ_b L_b, anchor)`` runs the backward. Only activation gradients are computed: no
   weight is an input of that call, so autograd skips every weight-gradient matmul. Each tap's backward
   receives G, the gradient w.r.t. its module's output, whose slice b is sample b's own output gradient.
3. On arrival, the module's rule (``gradsel_core.rules``) turns (input, G) into factors
   (``gradsel_core.factors``), reduced at once, so activations and G are released as the backward proceeds.
   A parameter with several uses (tied embeddings, a module called twice, a functional use) keeps its
   factors until all uses have arrived, then adds the cross terms ||Σ_u g_u||² = Σ_u ||g_u||² + 2 Σ ⟨g_u, g_v⟩.
4. Modules without a rule are first scored through their op uses (below); a parameter used by an op
   without a rule is computed exactly by a torch.func fallback restricted to its module: ``vmap`` over
   samples of ``vjp`` of the module alone, at its captured inputs and output gradients.
5. Every other use of a selected parameter is accounted for (``gradsel_core.ghost.standins``, ``gradsel_core.ghost.uses``): detected
   through stand-ins at no cost, then scored as an op use (``F.linear``, ``x @ W.T``, ``y + b``,
   ``F.embedding``, slices ``P[e]`` and ``grouped_mm`` of fused expert weights) or by moving the parameter
   to a module fallback that encloses all its uses. What cannot be scored exactly is refused with
   :class:`UnsupportedModule`, naming the parameter and the place.
6. Activations whose dim 0 is not the batch (OPT's (B·T, d) rows, tokens routed to experts) are read
   through a proven row -> sample map (``gradsel_core.ghost.rows``), carried by row-wise rules and, for models
   that need it, through ops by the same mode; rows without one are never read as samples.

A rule applies only to its registered class, or to a subclass that does not override ``forward``
(``gradsel_core.rules.find_rule``). Subclasses of Linear / Embedding that override ``forward`` (Gemma's scaled embedding,
OPT's offset positions, a Linear that scales its output) are scored through their op uses.

:class:`GhostBackend` holds what one engine learned about its model (moved modules, op-tracked parameters,
taps that must copy because the model writes into module outputs in place); the first batch may take a few
extra passes to learn it, each with one warning.

One concept per file:

- ``plan.py``: which module scores which selected parameter (rule, op uses, module fallback);
- ``capture.py``: one scored forward (hooks, taps) and its activation backward (the sink, cross terms);
- ``standins.py``: leaves sharing each parameter's storage, so that an unaccounted use shows up;
- ``uses.py``: op uses (``F.linear``, ``x @ W.T``, ``F.embedding``, expert slices, ``grouped_mm``) and their factors;
- ``rows.py``: proven row -> sample maps of flattened and routed activations;
- ``fallback.py``: the torch.func fallback over one module;
- ``failures.py``: what failed on a pass, and the signal to run it again;
- ``backend.py``: the retry/learning loop, what an engine learned about its model.
"""
from .backend import MAX_PASSES, GhostBackend, score_ghost
from .capture import GhostCapture, shared_sq_norm
from .failures import Retry, RuleFailure, RuleFailures
from .plan import GhostPlan, ModulePlan, plan_claims
from .rows import Rows, flatten_rows

__all__ = ["GhostBackend", "score_ghost", "MAX_PASSES", "GhostCapture", "shared_sq_norm", "GhostPlan", "ModulePlan",
           "plan_claims", "Retry", "RuleFailure", "RuleFailures", "Rows", "flatten_rows"]
