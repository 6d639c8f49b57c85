"""The generator abstraction: a CVAE over registered adapters, conditioned on a task, sampled for a new one.

Both methods (SG-LoRA, sg_lora.py; ICM-LoRA, icm_lora.py) fit the same thing and differ in two hooks:

    represent(task)  -> r (D,)    SG-LoRA: the description's embedding; ICM-LoRA: an in-context task
                                  vector from the base model's hidden states over a few examples
    prior(experts, w) -> p(z)     SG-LoRA: formed from the top-k most similar experts' posteriors;
                                  ICM-LoRA: N(0, I)

Everything else is shared (`CVAEGenerator`):

  fit:      training vectors (each member's adapter and its training snapshots) -> `ParamSpace`
            coordinates x (n, m); each member's representation r_j and similarity profile w_j over the
            N members; the CVAE is fitted on (x, c = [r~, w, progress]), r~ = normalise(w R) the
            representation aggregated over the known tasks (or r itself, fuse_condition=false).
  generate: r_q = represent(query); s = R r_q (N,) cosine similarities to the known tasks;
            refuse when 1 - max(s) > max_distance (`OutOfRange`, with the distance and the threshold);
            w = softmax(top-k(s) / temperature); z ~ prior; x = g(z, c(r~_q, w, t=1));
            theta = ParamSpace.decode(x); adapter = ParamLayout.unflatten(theta).

The catalog `GENERATORS` imports the method modules on first lookup (the CLI stays fast).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from pydantic import Field

from loraplex.catalog import MAX_COUNT, MAX_SCALE, MAX_TEMPERATURE, MIN_TEMPERATURE, Catalog, Options, options
from loraplex.errors import IncompatibleAdapter, UserInputError
from loraplex.experts.spec import Adapter
from loraplex.generators.cvae import CVAE, CVAEConfig, fit_cvae
from loraplex.generators.layout import ParamLayout
from loraplex.generators.refine import RefineConfig, examples_task, refine as refine_coords, refined_theta
from loraplex.generators.space import ParamSpace
from loraplex.heads import head_for
from loraplex.tasks import Task

GENERATORS: Catalog["CVAEGenerator"] = Catalog(
    "generator", modules=["loraplex.generators.sg_lora", "loraplex.generators.icm_lora"])


class OutOfRange(UserInputError):
    """A task description or example set too far from every task a generator learned from."""


class GeneratorConfig(Options):
    """Settings every generator has (each method's config extends it)."""

    model_config = options()

    top_k: int = Field(3, ge=1, le=MAX_COUNT)
    """How many of the most similar known tasks form the condition (and SG-LoRA's prior)."""
    temperature: float = Field(0.05, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    """Softmax temperature over the top-k cosine similarities."""
    max_distance: float = Field(0.55, gt=0, le=2)
    """Refuse a task whose cosine distance (1 - similarity) to its nearest known task exceeds this."""
    sample_scale: float = Field(1.0, ge=0, le=MAX_SCALE)
    """Scale of the latent noise when sampling (0 gives the prior's mean)."""
    snapshots: bool = True
    """Learn from the members' training snapshots too (not only their final adapters)."""
    fuse_condition: bool = True
    """Condition on the similarity-weighted mix of the known tasks' representations (within the hull the CVAE
    was fitted on) instead of the new task's own representation."""
    cvae: CVAEConfig = CVAEConfig()
    """The conditional VAE."""


@dataclass
class TrainingSet:
    """What a generator learns from: N member adapters, n >= N vectors (finals and snapshots)."""

    layout: ParamLayout
    members: list[str]  # N adapter names
    descriptions: list[str]  # N
    tasks: list[str | None]  # N task refs (ICM-LoRA reads their examples)
    base: str
    vectors: torch.Tensor  # (n, P)
    owner: list[int]  # (n,) index of the member each vector belongs to
    progress: torch.Tensor  # (n,) step / final step, 1.0 for a final adapter
    sources: list[tuple[str, int]]  # (n,) (adapter, snapshot step) or (adapter, -1) for the adapter itself
    desc_embeddings: torch.Tensor | None = None  # (N, D) the registry's stored description embeddings
    task_cards: dict[str, dict] = field(default_factory=dict)  # task ref -> what the registry recorded of it
    blobs: dict[str, str] = field(default_factory=dict)  # member -> its weights' blob as read (add_adapter checks it)

    def without(self, names: Sequence[str]) -> "TrainingSet":
        """The same set with the members `names` left out: their adapters, every snapshot of them and
        their descriptions (a leave-one-out fit reads the training vectors once and drops the held-out
        task here, so the generator never sees it)."""
        drop = set(names)
        unknown = drop - set(self.members)
        if unknown:
            raise UserInputError(f"not members of this training set: {', '.join(sorted(unknown))}")
        keep = [i for i, m in enumerate(self.members) if m not in drop]
        if not keep:
            raise UserInputError("leaving out every member leaves nothing to learn from")
        new_index = {old: new for new, old in enumerate(keep)}
        rows = [j for j, o in enumerate(self.owner) if o in new_index]
        kept_tasks = {self.tasks[i] for i in keep}
        return TrainingSet(
            layout=self.layout, members=[self.members[i] for i in keep],
            descriptions=[self.descriptions[i] for i in keep], tasks=[self.tasks[i] for i in keep], base=self.base,
            vectors=self.vectors[rows], owner=[new_index[self.owner[j]] for j in rows], progress=self.progress[rows],
            sources=[self.sources[j] for j in rows],
            desc_embeddings=None if self.desc_embeddings is None else self.desc_embeddings[keep],
            task_cards={t: c for t, c in self.task_cards.items() if t in kept_tasks},
            blobs={m: b for m, b in self.blobs.items() if m not in drop})


@dataclass
class Query:
    """The new task: its description and, for ICM-LoRA (and refinement), a few examples (text, label or None).

    `task`: the label set and label texts the examples answer, when known (refinement scores the labels
    through their texts); otherwise the labels of the examples themselves (`refine.examples_task`)."""

    description: str
    examples: Sequence[tuple[str, str | None]] = ()
    task: Task | None = None


@dataclass
class Generation:
    adapter: Adapter
    parents: list[dict[str, Any]]  # [{"name", "similarity", "weight"}], most similar first
    distance: float  # cosine distance to the nearest known task
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class GenContext:
    """What generators may need from outside: an embedder for texts, a base model for hidden states.

    Both are loaded lazily, once, so a generator that does not need the base model never loads it."""

    def __init__(self, settings, embedder_name: str, base: str | None = None):
        self.settings = settings
        self.embedder_name = embedder_name
        self.base_name = base
        self._base = None

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        from loraplex.embedders import get_embedder

        return torch.from_numpy(get_embedder(self.embedder_name).encode(list(texts)))  # (N, D)

    def base(self):
        if self._base is None:
            from loraplex.models import load_base

            self._base = load_base(self.base_name, self.settings)
        return self._base


def similarity_profile(rep: torch.Tensor, known: torch.Tensor, top_k: int, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (B, N) of reps (B, D) to known (N, D), and softmax weights over each row's top-k."""
    sims = torch.nn.functional.normalize(rep, dim=-1) @ torch.nn.functional.normalize(known, dim=-1).T  # (B, N)
    k = min(top_k, known.shape[0])
    top, idx = sims.topk(k, dim=-1)  # (B, K)
    weights = torch.zeros_like(sims).scatter(-1, idx, torch.softmax(top / temperature, dim=-1))  # (B, N)
    return sims, weights


class CVAEGenerator:
    """A fitted (or fittable) generator; subclasses set `method` and implement the two hooks."""

    method: ClassVar[str] = ""

    def __init__(self, config: GeneratorConfig, context: GenContext):
        self.config = config
        self.ctx = context
        self.data: TrainingSet | None = None
        self.space: ParamSpace | None = None
        self.cvae: CVAE | None = None
        self.known: torch.Tensor | None = None  # (N, D) the members' representations

    # ---- method hooks ------------------------------------------------------------------------
    def represent_members(self, data: TrainingSet) -> torch.Tensor:
        """(N, D) representations of the member tasks."""
        raise NotImplementedError

    def represent_query(self, query: Query) -> torch.Tensor:
        """(D,) representation of a new task."""
        raise NotImplementedError

    def prior(self, mu: torch.Tensor, logvar: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (Z,) of p(z) for a new task, given the members' posteriors (N, Z) and its weights (N,)."""
        raise NotImplementedError

    def what(self) -> str:
        """How the method names what it conditions on, for messages ('description', 'example set')."""
        return "task"

    # ---- fitting -----------------------------------------------------------------------------
    def fit(self, data: TrainingSet, *, progress: bool = False) -> dict[str, Any]:
        """Fit the parameter space and the CVAE on the training set; returns fit metrics."""
        cfg = self.config
        if "top_k" in cfg.model_fields_set and cfg.top_k > len(data.members):  # the default is capped at what there is
            raise UserInputError(f"top_k={cfg.top_k} is more than the {len(data.members)} adapters the generator "
                                 "learns from")
        t0 = time.perf_counter()
        self.data = data
        self.space = ParamSpace.fit(data.layout, data.vectors, max_dims=cfg.cvae.max_dims)
        self.known = self.represent_members(data).float()  # (N, D)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(cfg.cvae.seed)
            self.cvae = CVAE(self.space.dims, self.known.shape[1], len(data.members), cfg.cvae)
        rep, weights = self._member_conditions()
        hist = fit_cvae(self.cvae, self.space.coords, (rep, weights, data.progress.float()), cfg.cvae,
                        progress=progress, desc=f"fitting {self.method}")
        member_params = len(data.members) * data.layout.size
        return {
            "members": len(data.members),
            "vectors": int(data.vectors.shape[0]),
            "space_dims": self.space.dims,
            "space_error": round(self.space.fit_error(data.vectors), 5),
            "recon_mse": round(hist.recon, 6),
            "kl": round(hist.kl, 4),
            "cvae_params": self.cvae.n_params,
            "stored_params": self.stored_params(),
            "member_params": member_params,
            "trained_params": int(data.vectors.numel()),
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }

    def _cond_rep(self, rep: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The representation the condition reads (B, D): fused over the known tasks, or the task's own."""
        if self.config.fuse_condition:
            return torch.nn.functional.normalize(weights @ self.known, dim=-1)  # (B, N) @ (N, D)
        return rep

    def _member_conditions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per training vector: its member's condition representation (n, D) and similarity profile (n, N)."""
        _, w = similarity_profile(self.known, self.known, self.config.top_k, self.config.temperature)  # (N, N)
        owner = torch.tensor(self.data.owner)
        return self._cond_rep(self.known, w)[owner], w[owner]

    # ---- storing -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, extra) to store in the registry; the training vectors themselves are not stored."""
        tensors = {f"cvae.{k}": v for k, v in self.cvae.state_dict().items()}
        tensors.update(self.space.state())
        tensors["known"] = self.known
        extra = {"layout": self.data.layout.to_json(), "sources": [list(s) for s in self.data.sources],
                 "progress": [round(float(p), 6) for p in self.data.progress], "owner": list(self.data.owner)}
        return tensors, extra

    def stored_params(self) -> int:
        tensors, _ = self.state()
        return int(sum(t.numel() for t in tensors.values()))

    def restore(self, data: TrainingSet, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Load a stored generator (its training vectors read back from the registry)."""
        self.data = data
        self.space = ParamSpace.from_state(data.layout, data.vectors, tensors, where=where)
        self.known = tensors["known"].float()
        self.cvae = CVAE(self.space.dims, self.known.shape[1], len(data.members), self.config.cvae)
        state = {k[len("cvae."):]: v for k, v in tensors.items() if k.startswith("cvae.")}
        try:
            self.cvae.load_state_dict(state)
        except RuntimeError as exc:
            raise IncompatibleAdapter(f"{where}: stored weights do not fit its configuration ({str(exc).splitlines()[0]})") from None
        self.cvae.eval()

    # ---- generating --------------------------------------------------------------------------
    def generate(self, query: Query, *, seed: int = 0, where: str = "generator",
                 refine: RefineConfig | None = None,
                 on_refine_step: Callable[[int, torch.Tensor], None] | None = None) -> Generation:
        """Sample an adapter for a new task (deterministic for a given seed); with `refine` (steps > 0), the
        sample is then refined on the query's labelled examples (refine.py; `on_refine_step(step, theta)`
        after each of its steps, with the (P,) vector so far, which `self.data.layout.unflatten` turns into an
        adapter)."""
        if refine is not None and refine.steps > 0 and not query.examples:
            raise UserInputError("refining a generated adapter needs labelled examples of the task (--examples FILE)")
        cfg = self.config
        t0 = time.perf_counter()
        rep = self.represent_query(query).float().reshape(1, -1)  # (1, D)
        sims, weights = similarity_profile(rep, self.known, cfg.top_k, cfg.temperature)  # (1, N)
        best = int(sims[0].argmax())
        distance = 1.0 - float(sims[0, best])
        if distance > cfg.max_distance:
            raise OutOfRange(
                f"the {self.what()} is too far from every task {where} learned from: the nearest, "
                f"{self.data.members[best]!r}, is at cosine distance {distance:.3f} (similarity {1 - distance:.3f}), "
                f"beyond max_distance {cfg.max_distance:g}; nothing was generated")
        with torch.no_grad():
            mu_k, logvar_k = self._member_posteriors()  # (N, Z)
            mu, std = self.prior(mu_k, logvar_k, weights[0])  # (Z,)
            gen = torch.Generator().manual_seed(int(seed))
            z = mu + cfg.sample_scale * std * torch.randn(mu.shape, generator=gen)  # (Z,)
            c = self.cvae.condition(self._cond_rep(rep, weights), weights, torch.ones(1))  # (1, C)
            x = self.cvae.decode(z.unsqueeze(0), c)  # (1, m)
        extra: dict[str, Any] = {"seed": int(seed)}
        if refine is not None and refine.steps > 0:
            task = examples_task(query.description, query.examples, like=query.task)
            base = self.ctx.base()
            seen = None if on_refine_step is None else (
                lambda k, xk: on_refine_step(k, refined_theta(self.space, xk, x[0], refine.blocks)))
            xr, info = refine_coords(self.space, x[0], base, head_for(base), task, refine, seen)
            extra["refine"] = {"steps": refine.steps, "examples": len(task.train), **info}
            theta = refined_theta(self.space, xr, x[0], refine.blocks)  # (P,)
        else:
            with torch.no_grad():
                theta = self.space.decode(x)[0]  # (P,)
        adapter = self.data.layout.unflatten(theta)
        order = torch.argsort(sims[0], descending=True)[: min(cfg.top_k, len(self.data.members))]
        parents = [{"name": self.data.members[int(i)], "similarity": round(float(sims[0, i]), 4),
                    "weight": round(float(weights[0, i]), 4)} for i in order]
        return Generation(adapter, parents, distance, time.perf_counter() - t0, extra)

    def _member_posteriors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x_j, c_j) of each member's final adapter: mu, logvar (N, Z)."""
        N = len(self.data.members)
        finals = [None] * N
        for i, (owner, (_, step)) in enumerate(zip(self.data.owner, self.data.sources)):
            if step < 0:
                finals[owner] = i
        idx = torch.tensor(finals)
        rep, w = self._member_conditions()
        c = self.cvae.condition(rep[idx], w[idx], torch.ones(N))
        return self.cvae.encode(self.space.coords[idx], c)
