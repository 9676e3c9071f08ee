"""LLM-FP4's per-layer search (spec sec. 4.3-4.6), vectorized over candidates.

A candidate clipping range is a multiplier gamma of a format's MinMax exponent bias (bias = gamma *
b_init, as the paper's search space [gamma1 * b_init, gamma2 * b_init]). States below keep gamma, so a
state is cheap to copy and the concrete biases are derived where needed.

Losses are the layer-output squared error against the full-precision output:
- the per-row weight search uses ||X w - Xq q||^2 = w'Gw - 2 q'(Xq'X)w + q'(Xq'Xq)q, whose cost does not
  grow with the number of calibration tokens;
- the activation (rho) search quantizes the inputs per candidate and may use a fixed random subset of the
  tokens (`act_search_tokens`); the per-channel statistics always come from every token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .formats import FPFormat, fp_formats, fp_quantize
from .quantizers import FPQuantizer, absmax

WEIGHT_FIRST = ("w_bias", "w_format", "a_bias", "a_format")  # FPQ baseline (paper Alg. 1)
BIAS_FIRST = ("w_bias", "a_bias", "w_format", "a_format")  # FPQ with pre-shifted bias (reference order)


@dataclass(frozen=True)
class SearchSettings:
    gamma_low: float = 0.01
    gamma_high: float = 1.2
    n_candidates: int = 100
    rounds: int = 3
    # "paper": gamma1 + i (gamma2 - gamma1) / n for i = 0..n, plus gamma = 1 (MinMax);
    # "reference": i = 0..n-1 only, as the released code (gamma2 and MinMax never tried).
    grid: str = "paper"
    # "full" evaluates every grid point; "coarse" evaluates every ~sqrt(N)-th point, then every point
    # around the best one (per row for weights): about 2 sqrt(N) evaluations instead of N.
    strategy: str = "full"
    format_space: str = "paper"
    # Integer channel offset k_j: "paper" round(b_j - rho); "reference" round(b_j) - round(rho).
    shift_rounding: str = "paper"
    # A format-selection step keeps the current quantizer unless a candidate is strictly better, so a
    # layer never ends worse than where it started (the reference can, see spec sec. 4.4).
    keep_better: bool = True
    act_search_tokens: int | None = None
    # Working memory of one layer's search (token chunks, kept outputs); None: 256 MB on a CPU, where the
    # model shares the host's memory, 2 GB on a GPU.
    memory_mb: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.gamma_low < self.gamma_high:
            raise ValueError(f"--search_intervals needs 0 < gamma1 < gamma2, got {self.gamma_low}, {self.gamma_high}")
        if self.n_candidates < 1 or self.rounds < 1:
            raise ValueError("--search_intervals n and --search_round must be at least 1")
        for name, value, allowed in (("grid", self.grid, ("paper", "reference")),
                                     ("strategy", self.strategy, ("full", "coarse")),
                                     ("shift_rounding", self.shift_rounding, ("paper", "reference"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def gammas(self) -> torch.Tensor:
        n, lo, hi = self.n_candidates, self.gamma_low, self.gamma_high
        points = [lo + i * (hi - lo) / n for i in range(n + (self.grid == "paper"))]
        if self.grid == "paper":
            points.append(1.0)
        return torch.tensor(sorted(set(points)), dtype=torch.float32)


def grid_argmin(loss_fn, gammas: torch.Tensor, rows: int, strategy: str, elements_per_row: int,
                budget_elements: int, start: torch.Tensor | None = None):
    """Minimise loss_fn over the grid, independently per row.

    loss_fn(g, rows) takes candidate multipliers g [C, len(rows)] for the row slice `rows` and returns
    losses [C, len(rows)]. Work is split into blocks of rows x candidates of about `budget_elements`
    elements, small enough to stay in cache instead of allocating huge temporaries.

    "full" evaluates every grid point. "coarse" evaluates every s0-th point (and the ends and gamma = 1),
    then the points at stride s1 < s0 within s0 of the best so far, and so on down to stride 1: about
    2 (s0 + n / s0) evaluations instead of n for a loss that is unimodal at the coarse scale. With `start`
    (grid indices [rows], e.g. the previous round's result) the coarse pass is replaced by that point.
    Returns (best grid index [rows], best loss [rows]).
    """
    n, device = gammas.numel(), gammas.device
    row_block = max(1, min(rows, budget_elements // max(1, elements_per_row)))
    chunk = max(1, budget_elements // (row_block * elements_per_row))
    best_index, best_loss = [], []
    for first in range(0, rows, row_block):
        block = slice(first, min(rows, first + row_block))
        count = block.stop - block.start
        cols = torch.arange(count, device=device)

        def evaluate(index):  # index [C, count] into gammas
            losses = torch.cat([loss_fn(gammas[index[i:i + chunk]], block) for i in range(0, index.shape[0], chunk)])
            pick = losses.argmin(0)
            return index[pick, cols], losses[pick, cols]

        if strategy == "full" or n <= 9:
            index, loss = evaluate(torch.arange(n, device=device)[:, None].expand(n, count))
        else:
            strides = _strides(n)
            if start is None:
                coarse = torch.cat([torch.arange(0, n, strides[0], device=device), torch.tensor([n - 1], device=device),
                                    torch.argmin((gammas - 1).abs()).reshape(1)]).unique()
                index, loss = evaluate(coarse[:, None].expand(-1, count))
            else:
                index, loss = evaluate(start[block].to(device)[None, :])
            for wider, stride in zip(strides, strides[1:]):
                reach = (wider - 1) // stride * stride
                offsets = torch.cat([torch.arange(-reach, 0, stride, device=device),
                                     torch.arange(stride, reach + 1, stride, device=device)])
                near_index, near_loss = evaluate((index[None, :] + offsets[:, None]).clamp(0, n - 1))
                better = near_loss < loss
                index, loss = torch.where(better, near_index, index), torch.where(better, near_loss, loss)
        best_index.append(index)
        best_loss.append(loss)
    return torch.cat(best_index), torch.cat(best_loss)


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class TokenSplit:
    """Where the calibration tokens a search sees lie when several data-parallel workers each hold a share of
    them: how many there are in all, each local token's index among them, and how per-worker sums and maxima
    over tokens combine. The default: every token is here."""
    total: int | None = None  # every worker's tokens together (None: the local ones are all)
    positions: torch.Tensor | None = None  # [local tokens] index of each among all, increasing (None: 0, 1, ...)
    sum: Callable[[torch.Tensor], torch.Tensor] = _unchanged
    max: Callable[[torch.Tensor], torch.Tensor] = _unchanged

    def count(self, local: int) -> int:
        return local if self.total is None else self.total

    def sampled(self, local: int, count: int | None) -> int:
        """How many tokens token_sample draws over all workers."""
        tokens = self.count(local)
        return tokens if count is None else min(count, tokens)


LOCAL = TokenSplit()


def token_sample(inputs: torch.Tensor, count: int | None, seed: int, split: TokenSplit = LOCAL) -> torch.Tensor:
    """`count` rows of inputs [tokens, in] drawn without replacement by `seed`, in their order (all if None). Under
    a `split` the draw is over every worker's tokens, and each keeps the drawn ones it holds: together the same
    sample as one process holding all."""
    tokens = split.count(inputs.shape[0])
    if count is None or count >= tokens:
        return inputs
    pick = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    if split.positions is not None:
        return inputs[torch.isin(split.positions, pick).to(inputs.device)]
    return inputs[pick.to(inputs.device)]


def _strides(n: int) -> list[int]:
    """Strides of the coarse strategy, coarsest first, each about the square root of the one before:
    n = 101 gives [10, 3, 2, 1]."""
    strides = [max(2, round(math.sqrt(n)))]
    while strides[-1] > 1:
        strides.append(max(1, round(math.sqrt(strides[-1]))))
    return strides


@dataclass(frozen=True)
class WeightState:
    fmt: FPFormat | None  # None: not quantized
    gamma: torch.Tensor  # [out] multiplier of each row's MinMax bias

    def key(self):
        return self.fmt, self.gamma.cpu().numpy().tobytes()


@dataclass(frozen=True)
class ActState:
    fmt: FPFormat | None  # None: not quantized
    gamma: float  # multiplier of the tensor MinMax bias, or of rho_init = min_j b_j (pre-shifted)

    def key(self):
        return self.fmt, self.gamma


class LinearSearch:
    """Searches W and A formats and biases of one linear layer from its captured inputs.

    `inputs` is [tokens, in_features]; `per_channel` selects the pre-shifted per-channel activation
    bias (FPQ) instead of one tensor bias (FPQ baseline); `folded` puts the integer offsets into the
    weights (the paper's deployable form) instead of simulating per-channel activation biases.
    """

    def __init__(self, weight: torch.Tensor, inputs: torch.Tensor, settings: SearchSettings,
                 per_channel: bool, folded: bool = False, shared: dict | None = None, input_quantizer=None,
                 split: TokenSplit = LOCAL):
        if folded and not per_channel:
            raise ValueError("the folded pre-shifted bias needs per-channel activation biases")
        self.settings, self.per_channel, self.folded = settings, per_channel, folded
        # A fixed activation quantizer (e.g. FlatQuant's dynamic per-token one) that the weights are fitted
        # against when the activation side is not searched.
        self.input_quantizer = input_quantizer
        self.weight = weight.detach().float()
        self.device = self.weight.device
        self.inputs = inputs
        # Layers that read the same inputs (q/k/v, gate/up) pass one `shared` dict: the quantized-input
        # terms depend on the inputs and the activation state only, so they are computed once for all.
        self.shared = {} if shared is None else shared
        # Data-parallel workers hold a share of the tokens each: every sum and maximum over tokens below goes
        # through `split`, and every size that decides how work is chunked counts all tokens, so all workers
        # take the same steps.
        self.split = split
        self.channel_absmax = split.max(absmax(inputs, "channel").to(self.device))
        self.tensor_absmax = self.channel_absmax.max()
        self.tokens = split.count(inputs.shape[0])
        # With fewer tokens than input features the errors are cheaper to compute directly than through
        # in x in Gram matrices (e.g. a 7B block calibrated on few tokens).
        self.direct = self.tokens < self.weight.shape[1]
        self.outputs = self._keep_outputs()
        self.output_energy = split.sum(self._output_energy())
        self.sample = token_sample(inputs, settings.act_search_tokens, settings.seed, split).to(self.device,
                                                                                               torch.float32)
        self.samples = split.sampled(inputs.shape[0], settings.act_search_tokens)
        self._sample_out = None  # X W' on the sample, for the direct form of the activation search
        self.gammas = settings.gammas().to(self.device)
        self._terms_cache: dict = {}
        # The coarse strategy starts later rounds from each format's previous per-row result.
        self._last_index: dict = {}

    # ----- activations -----
    def act_bias(self, fmt: FPFormat, gamma: torch.Tensor):
        """Biases for multipliers gamma [C]: (bias [C, 1, in] or [C, 1, 1], shift k [C, in] or None)."""
        gamma = gamma.reshape(-1, 1)
        if not self.per_channel:
            return (gamma * fmt.bias_for_maxval(self.tensor_absmax)).reshape(-1, 1, 1), None
        channel_bias = fmt.bias_for_maxval(self.channel_absmax)  # b_j, [in]
        rho = gamma * channel_bias.min()  # [C, 1]
        if self.settings.shift_rounding == "paper":
            shift = torch.round(channel_bias - rho)
        else:
            shift = torch.round(channel_bias) - torch.round(rho)
        shift = shift.clamp(0, fmt.max_exponent_code)
        return (rho + shift)[:, None, :], shift

    def quantize_inputs(self, x, state: ActState):
        if state.fmt is None:
            return x if self.input_quantizer is None else self.input_quantizer(x)
        bias, _ = self.act_bias(state.fmt, torch.tensor([state.gamma], device=self.device))
        return fp_quantize(x, state.fmt, bias[0])

    def shift_of(self, state: ActState):
        if not self.folded or state.fmt is None:
            return None
        return self.act_bias(state.fmt, torch.tensor([state.gamma], device=self.device))[1][0]

    # ----- weights -----
    def shifted_weight(self, fmt: FPFormat, shift=None, rows=slice(None)):
        """(W 2^-k, its per-row MinMax bias in `fmt`) for the rows `rows` and shift k [in] (or None)."""
        w = self.weight[rows] if shift is None else self.weight[rows] * torch.exp2(-shift)
        return w, fmt.bias_for_maxval(w.abs().amax(-1))

    def effective_weight(self, fmt: FPFormat, gamma: torch.Tensor, shift=None, rows=slice(None),
                         shifted=None) -> torch.Tensor:
        """Q(W 2^-k; gamma * b_init) 2^k of the rows `rows`, for their multipliers gamma [..., len(rows)] and
        shift k [in] (or None). `shifted` is shifted_weight(fmt, shift) of every row, if the caller has it."""
        if fmt is None:
            return self.weight[rows]
        w, b_init = self.shifted_weight(fmt, shift, rows) if shifted is None else (shifted[0][rows], shifted[1][rows])
        q = fp_quantize(w, fmt, gamma[..., None] * b_init[:, None])
        return q if shift is None else q.mul_(torch.exp2(shift))

    def row_blocks(self) -> list[slice]:
        """Row slices small enough that whole-matrix work never makes full-size temporaries."""
        out_features, in_features = self.weight.shape
        step = max(1, self._budget() // in_features)
        return [slice(i, min(out_features, i + step)) for i in range(0, out_features, step)]

    def effective_blocks(self, weight: WeightState, shift):
        """(rows, effective weight of those rows) covering the matrix, one block at a time (never the whole
        quantized matrix at once: for lm_head that is a second copy of the vocabulary table)."""
        return ((rows, self.effective_weight(weight.fmt, weight.gamma[rows], shift, rows)) for rows in self.row_blocks())

    def weight_bias(self, state: WeightState, act: ActState) -> torch.Tensor:
        shift = self.shift_of(act)
        b_init = torch.cat([self.shifted_weight(state.fmt, shift, rows)[1] for rows in self.row_blocks()])
        return (state.gamma * b_init)[:, None]

    # ----- losses -----
    def _accumulate(self, fn):
        """sum of fn(x, y) over float32 token chunks x of the inputs and their full-precision outputs y
        (y is None unless the outputs are kept); chunks of about `memory_mb`."""
        in_features = self.weight.shape[1]
        chunk = max(1, (memory_mb(self.settings, self.device) << 18) // (4 * max(in_features, self.weight.shape[0])))
        total = 0
        for start in range(0, self.inputs.shape[0], chunk):
            x = self.inputs[start:start + chunk].to(self.device, torch.float32)
            total = total + fn(x, None if self.outputs is None else self.outputs[start:start + chunk])
        return total

    def _keep_outputs(self):
        """X W', kept when it fits in `memory_mb` and some term is cheaper with it (narrow layers)."""
        (out_features, in_features), tokens = self.weight.shape, self.inputs.shape[0]
        budget = memory_mb(self.settings, self.device)
        if self.direct or out_features > in_features or tokens * out_features * 4 > budget << 20:
            return None
        chunk = max(1, (budget << 18) // (4 * in_features))
        return torch.cat([self.inputs[i:i + chunk].to(self.device, torch.float32) @ self.weight.T
                          for i in range(0, tokens, chunk)])

    def _output_energy(self):
        """||X w_r||^2 per row, the part of every row loss that no quantizer changes."""
        (out_features, in_features), tokens = self.weight.shape, self.tokens
        if self.outputs is not None:
            return self.outputs.pow(2).sum(0)
        if in_features * (tokens + out_features) < tokens * out_features:  # wide layers: w'(X'X)w is cheaper
            gram = self._accumulate(lambda x, _: x.T @ x)
            return torch.cat([((self.weight[rows] @ gram) * self.weight[rows]).sum(-1) for rows in self.row_blocks()])
        return self._accumulate(lambda x, _: (x @ self.weight.T).pow_(2).sum(0))

    def _input_term(self, act: ActState):
        """Xq (direct form) or Xq'Xq (Gram form), from the cache shared by layers with these inputs."""
        key = ("direct" if self.direct else "gram", self.per_channel, self.settings.shift_rounding, *act.key())
        if key not in self.shared:
            while len(self.shared) >= 3:  # MinMax and the states under comparison; older ones are not reused
                self.shared.pop(next(iter(self.shared)))
            if self.direct:
                self.shared[key] = self.quantize_inputs(self.inputs.to(self.device, torch.float32), act)
            else:
                def gram(x, _):
                    xq = self.quantize_inputs(x, act)
                    return xq.T @ xq
                self.shared[key] = self.split.sum(self._accumulate(gram))
        return self.shared[key]

    def _act_terms(self, act: ActState):
        """(Xq, (X W')') in direct form; (Xq'Xq, 2 (Xq' X W')') in Gram form."""
        key = act.key()
        if key not in self._terms_cache:
            # Format selection compares two states; a wide layer's Gram-form cross term is as large as its
            # weight (lm_head: the vocabulary table), so there only one state is kept and the other recomputed.
            weight_mb = self.weight.numel() * 4 >> 20
            keep = 2 if weight_mb <= memory_mb(self.settings, self.device) // 4 else 1
            while len(self._terms_cache) >= keep:
                self._terms_cache.pop(next(iter(self._terms_cache)))
            if self.direct:
                x = self.inputs.to(self.device, torch.float32)
                cross = (x @ self.weight.T).T.contiguous()
            else:
                out_features, in_features = self.weight.shape
                tokens = self.tokens
                quant = lambda x: self.quantize_inputs(x, act)  # noqa: E731
                # Xq'(X W') costs tokens*in*out with the outputs kept, twice that without; (Xq'X) W' costs
                # tokens*in^2 + out*in^2
                if self.outputs is not None:
                    cross = 2 * self._accumulate(lambda x, y: quant(x).T @ y).T
                elif 2 * out_features * tokens < (tokens + out_features) * in_features:
                    cross = 2 * self._accumulate(lambda x, _: quant(x).T @ (x @ self.weight.T)).T
                else:
                    cross = 2 * self.weight @ self._accumulate(lambda x, _: quant(x).T @ x).T
                cross = self.split.sum(cross)
            self._terms_cache[key] = (self._input_term(act), cross)
        return self._terms_cache[key]

    def row_losses(self, q: torch.Tensor, act: ActState, rows=slice(None)) -> torch.Tensor:
        """||X w_r - Xq q_r||^2 per row for effective weights q [..., out, in] of the rows `rows`."""
        if self.direct:
            xq, out_t = self._act_terms(act)
            return self.split.sum((q @ xq.T).sub_(out_t[rows]).pow_(2).sum(-1))
        gq, cross2 = self._act_terms(act)  # q'Gq - 2 q'c + ||Xw||^2 = q'(Gq - 2c) + ||Xw||^2
        return (q @ gq).sub_(cross2[rows]).mul_(q).sum(-1).add_(self.output_energy[rows]).clamp_min(0)

    @property
    def row_cost(self) -> int:
        """Elements one candidate row occupies while its loss is computed."""
        return max(self.weight.shape[1], self.tokens if self.direct else 0)

    def layer_loss(self, weight: WeightState, act: ActState) -> float:
        blocks = self.effective_blocks(weight, self.shift_of(act))
        return sum(self.row_losses(q, act, rows).sum().item() for rows, q in blocks)

    def sample_loss_fn(self, blocks, fmt: FPFormat, candidates: int):
        """loss(gamma [C]) -> output squared error on the token sample for activation multipliers gamma,
        with the effective weight held fixed (`blocks` from effective_blocks); `candidates` is about how
        many will be asked."""
        samples, in_features = self.samples, self.weight.shape[1]
        out_features = self.weight.shape[0]

        def quantized(gamma):
            return fp_quantize(self.sample, fmt, self.act_bias(fmt, gamma)[0])  # [C, S, in]

        gram_cost = out_features * in_features * (in_features + samples) + candidates * samples * in_features ** 2
        if gram_cost >= candidates * samples * in_features * out_features:
            if self._sample_out is None:  # this branch serves narrow layers, whose outputs are small
                self._sample_out = self.sample @ self.weight.T
            kept = list(blocks)

            def direct(gamma):
                xq = quantized(gamma)
                return self.split.sum(sum((xq @ q.T).sub_(self._sample_out[:, rows]).pow_(2).sum((-1, -2))
                                          for rows, q in kept))
            return direct
        # Wide layers (gate/up, lm_head): ||Y - Xq W'||^2 = ||Y||^2 - 2<Xq, Y W> + <Xq W'W, Xq>, which costs
        # samples * in^2 per candidate instead of samples * in * out; Y = X W' is formed one row block at a time.
        gram = torch.zeros(in_features, in_features, device=self.device)
        target2 = torch.zeros(self.sample.shape[0], in_features, device=self.device)
        energy = torch.zeros((), device=self.device)
        for rows, q in blocks:
            out = self.sample @ self.weight[rows].T
            gram.addmm_(q.T, q)
            target2.addmm_(out, q, alpha=2)
            energy += out.pow(2).sum()

        def loss(gamma):
            xq = quantized(gamma)
            return self.split.sum((xq @ gram).sub_(target2).mul_(xq).sum((-1, -2)).add_(energy)).clamp_min(0)
        return loss

    def _budget(self) -> int:
        return budget_elements(self.settings, self.device)

    # ----- the four steps -----
    def search_weight_bias(self, fmt: FPFormat, act: ActState) -> tuple[WeightState, float]:
        shift = self.shift_of(act)
        out_features = self.weight.shape[0]
        shifted = self.shifted_weight(fmt, shift)
        loss_fn = lambda g, rows: self.row_losses(self.effective_weight(fmt, g, shift, rows, shifted), act, rows)  # noqa: E731,E501
        index, loss = grid_argmin(loss_fn, self.gammas, out_features, self.settings.strategy, self.row_cost,
                                  self._budget(), start=self._last_index.get(("w", fmt)))
        self._last_index[("w", fmt)] = index
        return WeightState(fmt, self.gammas[index]), loss.sum().item()

    def search_act_bias(self, fmt: FPFormat, weight: WeightState, act: ActState) -> ActState:
        # The other operand is held fixed, as in every alternating step: here the current effective
        # weight (in folded form, quantized at the current shifts; the next weight step re-fits it).
        fixed = self.effective_blocks(weight, self.shift_of(act))
        loss = self.sample_loss_fn(fixed, fmt, candidates=self.gammas.numel())
        size = self.samples * (self.weight.shape[1] + min(self.weight.shape))
        index, _ = grid_argmin(lambda g, _rows: loss(g[:, 0])[:, None], self.gammas, 1, self.settings.strategy,
                               size, 4 * self._budget(), start=self._last_index.get(("a", fmt)))
        self._last_index[("a", fmt)] = index
        return ActState(fmt, self.gammas[index].item())

    def select_weight(self, candidates, current: WeightState, act: ActState, known_losses: dict):
        options = list(candidates) + ([current] if self.settings.keep_better else [])
        losses = [known_losses.get(c.key()) for c in options]
        losses = [self.layer_loss(c, act) if loss is None else loss for c, loss in zip(options, losses)]
        return _pick(options, losses, current if self.settings.keep_better else None)

    def select_act(self, candidates, current: ActState, weight: WeightState) -> ActState:
        # Compare the formats on the token sample (as the rho search did), then confirm on every token.
        def sample_loss(act):
            blocks = self.effective_blocks(weight, self.shift_of(act))
            loss = self.sample_loss_fn(blocks, act.fmt, candidates=1)
            return loss(torch.tensor([act.gamma], device=self.device)).item()
        best = _pick(candidates, [sample_loss(c) for c in candidates], None)
        if self.settings.keep_better and best.key() != current.key():
            if self.layer_loss(weight, best) >= self.layer_loss(weight, current):
                return current
        return best

    def run(self, w_format: FPFormat | None, a_format: FPFormat | None, order=BIAS_FIRST, search=True):
        """The alternating search from MinMax states in the given formats (None: that side stays full
        precision). Returns (weight state, act state, {"minmax": loss, "searched": loss})."""
        space = self.settings.format_space
        weight = WeightState(w_format, torch.ones(self.weight.shape[0], device=self.device))
        act = ActState(a_format, 1.0)
        minmax_loss = self.layer_loss(weight, act)
        if w_format is None:
            order = [s for s in order if not s.startswith("w_")]
        if a_format is None:
            order = [s for s in order if not s.startswith("a_")]
        w_candidates, a_candidates, w_losses = [], [], {}
        for _ in range(self.settings.rounds if search else 0):
            start = (weight.key(), act.key())
            for step in order:
                if step == "w_bias":
                    results = [self.search_weight_bias(f, act) for f in fp_formats(w_format.bits, space, w_format.numerics)]
                    w_candidates = [s for s, _ in results]
                    w_losses = {s.key(): loss for s, loss in results}
                elif step == "a_bias":
                    a_candidates = [self.search_act_bias(f, weight, act) for f in fp_formats(a_format.bits, space, a_format.numerics)]
                elif step == "w_format":
                    weight = self.select_weight(w_candidates, weight, act, w_losses)
                else:
                    act = self.select_act(a_candidates, act, weight)
                    w_losses = {}  # those losses were measured against the previous activation state
            if (weight.key(), act.key()) == start:
                break  # converged: with the full grid a round depends only on its starting states
        return weight, act, {"minmax": minmax_loss, "searched": self.layer_loss(weight, act)}

    # ----- results as modules -----
    def weight_quantizer(self, weight: WeightState, act: ActState) -> FPQuantizer:
        return FPQuantizer(weight.fmt, self.weight_bias(weight, act))

    def act_quantizer(self, act: ActState) -> tuple[FPQuantizer, torch.Tensor | None]:
        """The activation quantizer and, in folded form, the input shift k to put into the weights."""
        bias, shift = self.act_bias(act.fmt, torch.tensor([act.gamma], device=self.device))
        if self.folded:
            rho = act.gamma * act.fmt.bias_for_maxval(self.channel_absmax).min()
            return FPQuantizer(act.fmt, rho.reshape(())), shift[0]
        return FPQuantizer(act.fmt, bias.reshape(-1) if self.per_channel else bias.reshape(())), None


def budget_elements(settings: SearchSettings, device) -> int:
    """Elements of one candidate block: a cache-sized block on CPU, `memory_mb` worth on a GPU."""
    if device.type == "cpu":
        return 1 << 20
    return (memory_mb(settings, device) << 20) // (4 * 8)  # ~8 float32 temporaries per element


def memory_mb(settings: SearchSettings, device) -> int:
    return settings.memory_mb or (256 if device.type == "cpu" else 2048)


def _pick(options, losses, incumbent):
    best = min(range(len(options)), key=lambda i: losses[i])
    if incumbent is not None:
        current = next(i for i, o in enumerate(options) if o is incumbent)
        if losses[best] >= losses[current]:
            return incumbent
    return options[best]


def search_embedding(weight: torch.Tensor, bits: int, settings: SearchSettings, numerics: str = "paper") -> FPQuantizer:
    """Per-row bias and one format minimising the table's own squared error (no data needed).

    Rows do not interact and nothing else changes between rounds, so one round gives the same
    result as the reference's repeated rounds.
    """
    weight = weight.detach().float()
    gammas = settings.gammas().to(weight.device)
    best = None
    for fmt in fp_formats(bits, settings.format_space, numerics):
        b_init = fmt.bias_for_maxval(weight.abs().amax(-1))

        def loss_fn(g, rows):
            w = weight[rows]
            return (fp_quantize(w, fmt, (g * b_init[rows])[..., None]) - w).pow_(2).sum(-1)

        index, loss = grid_argmin(loss_fn, gammas, weight.shape[0], settings.strategy, weight.shape[1],
                                  budget_elements(settings, weight.device))
        if best is None or loss.sum() < best[0]:
            best = (loss.sum().item(), FPQuantizer(fmt, (gammas[index] * b_init)[:, None]))
    return best[1]


def replace_settings(settings: SearchSettings, **changes) -> SearchSettings:
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
