"""Partition: which blocks each of K pipeline stages runs.

    part = partition(model, sample_input, stages=2)          # profiled and balanced
    part = partition(model, None, 2, split_points=["lstm.l1"])  # the user's cut, no profile
    print(part.describe())
    stage = part.build_stage(model, rank)                     # what this rank runs

The balancer cuts the chain of blocks (blocks.py) into K contiguous stages. A stage's cost is its
blocks' measured forward + backward time plus the time to move the tensors crossing its cuts
(activations out, gradients back in) at `bandwidth` bytes/s; the K-1 cuts minimise the largest
stage cost (exact dynamic programming over the chain), then, among the cuts that reach that
optimum, make the cheapest stage as expensive as possible, then move the fewest bytes. Some cuts are
never made (`cut_constraints`): none inside a span of blocks sharing a parameter or buffer (tied weights, a
module an nn.Sequential places twice: one rank must update it), none after a block whose output is not one
Tensor (stages exchange one Tensor).
NOTE: measured times differ from rank to rank, so one rank partitions and sends the result to
the others (to_dict / from_dict: plain JSON data); ranks never choose their own cuts.
"""
import math
from dataclasses import asdict, dataclass

from disttrain.parallel.pipeline.blocks import Stage, blocks_of
from disttrain.parallel.pipeline.profile import format_table, profile

DEFAULT_BANDWIDTH = 1e9  # bytes/s between neighbouring stages: a conservative figure for MPI on one host
_TIE = 1e-9              # relative slack under which two stage costs count as equal (float rounding)
FORMAT_VERSION = 1


class CutError(ValueError):
    """No cut into the stages asked for keeps tied weights in one stage and sends one Tensor across every cut,
    or the split points given break that."""


# ---- the balancer --------------------------------------------------------------------------------
def balance(costs, stages, cut_bytes=None, bandwidth=DEFAULT_BANDWIDTH, no_cut_before=()):
    """Bounds [0, b1, ..., b_{K-1}, n] cutting n blocks of the given costs into K = `stages` runs.

    costs: seconds per block (forward + backward). cut_bytes: bytes of each block's output, what
    crosses a cut placed right after it (n or n-1 entries); None ignores communication.
    no_cut_before: indices of blocks where no stage may start (CutError when no cut avoids them).
    Exact: minimises the largest stage cost, then maximises the smallest, then the bytes crossing.
    """
    costs = [float(c) for c in costs]
    n = len(costs)
    _check_stages(stages, n)
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise ValueError(f"balance: block costs must be finite and >= 0, got {costs}")
    if not bandwidth > 0:
        raise ValueError(f"balance: bandwidth must be > 0 bytes/s, got {bandwidth}")
    crossing = _crossing(cut_bytes, n)
    cost = _stage_cost_fn(costs, crossing, bandwidth, set(no_cut_before))
    top = _min_max(cost, n, stages)
    if top == math.inf:
        raise CutError(f"balance: no cut of {n} blocks into {stages} stages starts every stage at a block where "
                       f"a stage may start (not at blocks {sorted(no_cut_before)})")
    top *= 1 + _TIE
    floor = _max_min(cost, n, stages, top) * (1 - _TIE)
    return _fewest_bytes(cost, crossing, n, stages, floor, top)


def _check_stages(stages, n):
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive int, got {stages!r}")
    if stages > n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages: every stage needs at least one block")


def _crossing(cut_bytes, n):
    """Bytes crossing a cut after block i, for i < n-1 (zeros when unknown)."""
    if cut_bytes is None:
        return [0] * max(n - 1, 0)
    cut_bytes = list(cut_bytes)
    if len(cut_bytes) not in (n, n - 1):
        raise ValueError(f"cut_bytes has {len(cut_bytes)} entries for {n} blocks; expected {n} or {n - 1}")
    return [int(b) for b in cut_bytes[:n - 1]]


def _stage_cost_fn(costs, crossing, bandwidth, no_cut_before=frozenset()):
    """cost(i, j): blocks i..j-1's compute + their activations out and gradients back in (infinite for a stage
    starting or ending where no cut may be)."""
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    n = len(costs)

    def cost(i, j):
        if (0 < i and i in no_cut_before) or (j < n and j in no_cut_before):
            return math.inf
        moved = (crossing[i - 1] if i > 0 else 0) + (crossing[j - 1] if j < n else 0)
        return prefix[j] - prefix[i] + moved / bandwidth

    return cost


def _min_max(cost, n, stages):
    """The smallest possible largest stage cost. best[j]: over the first j blocks in k stages."""
    best = [cost(0, j) if j else math.inf for j in range(n + 1)]
    for k in range(2, stages + 1):
        best = [min((max(best[i], cost(i, j)) for i in range(k - 1, j)), default=math.inf) for j in range(n + 1)]
    return best[n]


def _max_min(cost, n, stages, top):
    """The largest possible smallest stage cost with every stage at most `top`."""
    def fits(i, j):
        return cost(i, j) if cost(i, j) <= top else -math.inf

    best = [fits(0, j) if j else -math.inf for j in range(n + 1)]
    for k in range(2, stages + 1):
        best = [max((min(best[i], fits(i, j)) for i in range(k - 1, j)), default=-math.inf) for j in range(n + 1)]
    return best[n]


def _fewest_bytes(cost, crossing, n, stages, floor, top):
    """The bounds moving the fewest bytes with every stage cost in [floor, top]; earliest cuts on ties."""
    def fits(i, j):
        return floor <= cost(i, j) <= top

    best = [(0, [0, j]) if j and fits(0, j) else (math.inf, None) for j in range(n + 1)]
    for k in range(2, stages + 1):
        nxt = []
        for j in range(n + 1):
            options = [(best[i][0] + crossing[i - 1], best[i][1][:-1] + [i, j]) for i in range(k - 1, j)
                       if best[i][1] is not None and fits(i, j)]
            nxt.append(min(options, key=lambda o: o[0]) if options else (math.inf, None))
        best = nxt
    return best[n][1]


# ---- split points from the user ------------------------------------------------------------------
def bounds_from_split_points(split_points, names, stages):
    """Bounds from the blocks (names or indices) where stages 1..K-1 start, validated."""
    n = len(names)
    _check_stages(stages, n)
    points = list(split_points)
    if len(points) != stages - 1:
        raise ValueError(f"split_points: {stages} stages need {stages - 1} split points, got {len(points)}: {points}")
    starts = []
    for p in points:
        if isinstance(p, str):
            if p not in names:
                raise ValueError(f"split_points: no block named {p!r}; the blocks are {names}")
            starts.append(names.index(p))
        elif isinstance(p, int) and not isinstance(p, bool):
            if not 1 <= p < n:
                raise ValueError(f"split_points: block index {p} out of range; a stage may start at "
                                 f"blocks 1..{n - 1} ({names[1:]})")
            starts.append(p)
        else:
            raise TypeError(f"split_points: expected block names or indices, got {p!r}")
    if 0 in starts:
        raise ValueError(f"split_points: {names[0]!r} is block 0, where stage 0 starts; name where stages "
                         f"1..{stages - 1} start")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"split_points must be strictly increasing along the chain, got {points} "
                         f"(block indices {starts})")
    return [0] + starts + [n]


# ---- the result ----------------------------------------------------------------------------------
@dataclass
class Partition:
    """K stages as bounds over the chain's blocks, with the per-block figures they were chosen from.

    bounds: [0, b1, ..., n]; stage k runs blocks bounds[k]:bounds[k+1]. Per-block lists (None
    when no profile was taken): block_costs (s, forward + backward), block_activation_bytes,
    block_output_bytes; block_param_bytes and block_param_counts (parameters, not bytes) are always
    known (block_param_counts is None in partitions written before it existed).
    """

    bounds: list
    block_names: list
    block_param_bytes: list
    block_costs: list = None
    block_activation_bytes: list = None
    block_output_bytes: list = None
    bandwidth: float = DEFAULT_BANDWIDTH
    chosen_by: str = "balancer"
    block_param_counts: list = None

    @property
    def stages(self):
        return len(self.bounds) - 1

    def stage_range(self, k):
        self._check_stage(k)
        return range(self.bounds[k], self.bounds[k + 1])

    def stage_blocks(self, k):
        """The names of stage k's blocks."""
        return [self.block_names[i] for i in self.stage_range(k)]

    def build_stage(self, model, k):
        """Stage k of `model` (the model this partition was made for: its block names must match)."""
        blocks = blocks_of(model)
        names = [name for name, _ in blocks]
        if names != list(self.block_names):
            raise ValueError(f"Partition.build_stage: the model's blocks {names} are not the partitioned "
                             f"blocks {list(self.block_names)}")
        return Stage([blocks[i] for i in self.stage_range(k)])

    def input_needs_gradient(self, model, k):
        """Whether stage k's input needs its gradient: a block of an earlier stage has a trainable parameter
        (requires_grad, read now). Where it does not, stage k sends no gradient back, and stage k-1 expects
        none."""
        blocks = blocks_of(model)
        return any(p.requires_grad for _, block in blocks[:self.bounds[k]] for p in block.parameters())

    def cut_bytes(self):
        """Bytes of the activation crossing each of the K-1 cuts (None without a profile)."""
        if self.block_output_bytes is None:
            return None
        return [self.block_output_bytes[b - 1] for b in self.bounds[1:-1]]

    def stage_compute(self, k):
        """Measured forward + backward seconds of stage k's blocks (None without a profile)."""
        return None if self.block_costs is None else sum(self.block_costs[i] for i in self.stage_range(k))

    def stage_cost(self, k):
        """stage_compute(k) + moving the activations out and gradients in at `bandwidth` (what the balancer minimises)."""
        if self.block_costs is None:
            return None
        crossing = _crossing(self.block_output_bytes, len(self.block_names))
        return _stage_cost_fn(self.block_costs, crossing, self.bandwidth)(self.bounds[k], self.bounds[k + 1])

    def stage_param_bytes(self, k):
        return sum(self.block_param_bytes[i] for i in self.stage_range(k))

    def stage_param_count(self, k):
        """The number of parameters stage k holds (None when unknown)."""
        if self.block_param_counts is None:
            return None
        return sum(self.block_param_counts[i] for i in self.stage_range(k))

    def stage_activation_bytes(self, k):
        """Bytes one micro-batch's forward keeps alive on stage k until its backward (None without a profile)."""
        if self.block_activation_bytes is None:
            return None
        return sum(self.block_activation_bytes[i] for i in self.stage_range(k))

    def imbalance(self):
        """Largest / smallest stage cost (1.0 is perfect balance; None without a profile)."""
        if self.block_costs is None:
            return None
        costs = [self.stage_cost(k) for k in range(self.stages)]
        return max(costs) / min(costs) if min(costs) > 0 else math.inf

    def describe(self):
        rows = []
        for k in range(self.stages):
            cut = self.cut_bytes()[k] if self.block_output_bytes is not None and k < self.stages - 1 else None
            rows.append((str(k), _span(self.stage_blocks(k)), _fmt(self.stage_compute(k), 1e3, ".3f"),
                         _fmt(self.stage_cost(k), 1e3, ".3f"), _fmt(self.stage_param_count(k), 1, ","),
                         _fmt(self.stage_param_bytes(k), 2**-20, ".3f"),
                         _fmt(self.stage_activation_bytes(k), 2**-20, ".3f"), _fmt(cut, 2**-20, ".3f")))
        head = (f"{self.stages} stages over {len(self.block_names)} blocks, chosen by {self.chosen_by}"
                + (f"; largest/smallest stage cost {self.imbalance():.3f}" if self.block_costs else ""))
        return head + "\n" + format_table(("stage", "blocks", "compute ms", "cost ms", "params", "param MB",
                                           "act MB", "cut out MB"), rows)

    def _check_stage(self, k):
        if not 0 <= k < self.stages:
            raise IndexError(f"stage {k} out of range for a partition of {self.stages} stages")

    # ---- plain data, to send from the rank that partitions to the others ---------------------
    def to_dict(self):
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"Partition.from_dict: format_version {version!r}, this code reads {FORMAT_VERSION}")
        part = cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in data.items()})
        n = len(part.block_names)
        bounds = part.bounds
        if not (len(bounds) >= 2 and bounds[0] == 0 and bounds[-1] == n
                and all(a < b for a, b in zip(bounds, bounds[1:]))):
            raise ValueError(f"Partition.from_dict: bounds {bounds} do not cut {n} blocks into non-empty stages")
        return part


def partition(model, sample_input, stages, split_points=None, sample_state=None, *,
              bandwidth=DEFAULT_BANDWIDTH, repeats=5, loss_fn=None, statistic="median", clock="wall",
              profiled=None):
    """Cut `model` into `stages` pipeline stages.

    Without split_points, the blocks are profiled on sample_input (and sample_state, the model's
    own state; loss_fn(y) -> scalar adds the loss to the last block; repeats, statistic and clock
    as in profile()) and balanced; `profiled` (a Profile of this model) skips the measurement.
    split_points (block names or indices where stages 1..K-1 start) override the balancer;
    sample_input may then be None (no costs shown).
    """
    blocks = blocks_of(model)
    names = [name for name, _ in blocks]
    _check_stages(stages, len(names))
    if split_points is not None:  # checked before a profile is spent on them
        bounds, chosen_by = bounds_from_split_points(split_points, names, stages), "split_points"
        _check_cuts(bounds, names, cut_constraints(blocks))
    if profiled is None and sample_input is not None:
        profiled = profile(blocks, sample_input, sample_state, repeats=repeats, loss_fn=loss_fn,
                           statistic=statistic, clock=clock)
    if profiled is not None and [b.name for b in profiled.blocks] != names:
        raise ValueError(f"partition: the profile's blocks {[b.name for b in profiled.blocks]} are not the "
                         f"model's {names}")
    if split_points is None and stages == 1:
        bounds, chosen_by = [0, len(names)], "one stage"
    elif split_points is None:
        if profiled is None:
            raise ValueError("partition: without split_points a sample_input (or a profile) is needed to balance")
        constraints = cut_constraints(blocks, [b.one_tensor for b in profiled.blocks])
        try:
            bounds = balance(profiled.costs(), stages, profiled.output_bytes(), bandwidth, no_cut_before=constraints)
        except CutError:
            raise CutError(f"partition: no cut into {stages} stages keeps every stage starting where one may: "
                           + "; ".join(f"not at block {names[i]!r}: {why}" for i, why in sorted(constraints.items()))
                           + f"; choose at most {len(names) - len(constraints)} stages") from None
        chosen_by = "balancer"
    own = _first_users(blocks)
    return Partition(
        bounds=bounds, block_names=names,
        block_param_bytes=[sum(p.data.nbytes for p in b.parameters() if own[id(p)] == i)
                           for i, (_, b) in enumerate(blocks)],
        block_param_counts=[sum(p.numel() for p in b.parameters() if own[id(p)] == i)
                            for i, (_, b) in enumerate(blocks)],
        block_costs=None if profiled is None else profiled.costs(),
        block_activation_bytes=None if profiled is None else [b.activation_bytes for b in profiled.blocks],
        block_output_bytes=None if profiled is None else profiled.output_bytes(),
        bandwidth=bandwidth, chosen_by=chosen_by)


def cut_constraints(blocks, one_tensor=None):
    """{i: why} for every block i of `blocks` ([(name, Block)]) where no stage may start.

    - a Parameter or buffer used by blocks on both sides (tied weights, a module an nn.Sequential places at two
      positions) would need its gradients summed, or its updates shared, across ranks, which the pipeline does
      not do;
    - one_tensor (per block, when known from a profile): whether the block's output is one Tensor; stages
      exchange one Tensor, so no stage starts after a block returning anything else.
    """
    why = {}
    users = {}
    for i, (name, block) in enumerate(blocks):
        for kind, members in (("parameter", block.named_parameters()), ("buffer", block.named_buffers())):
            for member_name, member in members:
                first = users.setdefault(id(member), (i, name, member_name))
                for start in range(first[0] + 1, i + 1):
                    why.setdefault(start, f"{kind} {first[2]!r} of block {first[1]!r} is {member_name!r} of block "
                                          f"{name!r} too; tied weights must stay in one stage")
    for i, single in enumerate(one_tensor or ()):
        if not single and i + 1 < len(blocks):
            why.setdefault(i + 1, f"block {blocks[i][0]!r} returns more than one Tensor; stages exchange one Tensor")
    return why


def _check_cuts(bounds, names, constraints):
    for start in bounds[1:-1]:
        if start in constraints:
            raise CutError(f"partition: a stage cannot start at block {names[start]!r}: {constraints[start]}; "
                           "choose split_points that start no stage there")


def _first_users(blocks):
    """{id(Parameter): the index of the first block using it}, so that a shared Parameter counts once."""
    first = {}
    for i, (_, block) in enumerate(blocks):
        for p in block.parameters():
            first.setdefault(id(p), i)
    return first


def _span(names):
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"


def _fmt(value, scale, spec):
    return "-" if value is None else format(value * scale, spec)
