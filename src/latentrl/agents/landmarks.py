"""Graph planning over landmarks from replay (SoRB, Eysenbach et al. 2019; DHRL, Lee et al. 2022).

The pieces goal_hrl's `agent.planning.method=graph` is made of, each usable and testable alone:

- `farthest_point_sampling`: landmarks spread over a latent space (each new point is the one
  farthest from those already picked; a 2-approximation of the best covering);
- `StepsFromValue`: the worker's goal-conditioned value read as a number of env steps, a monotone
  (isotonic) fit of the steps that separated replay pairs against the value of those pairs;
- `shortest_paths` (Floyd-Warshall with next hops, in torch) and `plan_route`: the route from the
  current state through the landmark graph to a target landmark; its first node is the subgoal;
- `LandmarkGraph`: what a rebuild produces (landmark observations, the value->steps fit, edge
  weights and all-pairs shortest paths), checkpointable as tensors;
- `draw_plan`: landmarks, edges and a planned route drawn over a maze's wall map (numpy only), for
  TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------- landmarks


def farthest_point_sampling(points: torch.Tensor, n: int) -> np.ndarray:
    """Indices of `n` of `points` (M, d), picked greedily: first the point farthest from their mean,
    then each time the point farthest (Euclidean) from every point picked so far. Deterministic.
    Property: every point lies within the smallest pairwise distance of the picked ones of some
    picked point (the covering radius is at most the separation)."""
    m = len(points)
    n = min(int(n), m)
    points = points.float()
    first = int((points - points.mean(0)).pow(2).sum(-1).argmax())
    chosen = [first]
    nearest = (points - points[first]).pow(2).sum(-1)  # squared distance to the nearest picked point
    for _ in range(n - 1):
        i = int(nearest.argmax())
        chosen.append(i)
        nearest = torch.minimum(nearest, (points - points[i]).pow(2).sum(-1))
    return np.asarray(chosen, dtype=np.int64)


# ----------------------------------------------------------------------------- value -> steps


def isotonic_decreasing(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares fit of y by a non-increasing function of x (pool adjacent violators).
    Returns the blocks of the fit over sorted x: (lowest x, highest x, fitted y) per block, y
    non-increasing from block to block."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, dtype=np.float64)[order], -np.asarray(y, dtype=np.float64)[order]
    # blocks as [sum, count, first index, last index]; fit -y non-decreasing
    sums, counts, lo, hi = [], [], [], []
    for i, v in enumerate(ys):
        sums.append(v), counts.append(1), lo.append(i), hi.append(i)
        while len(sums) > 1 and sums[-2] / counts[-2] > sums[-1] / counts[-1]:
            s, c, h = sums.pop(), counts.pop(), hi.pop()
            lo.pop()
            sums[-1] += s
            counts[-1] += c
            hi[-1] = h
    fitted = -np.asarray(sums) / np.asarray(counts)
    return xs[np.asarray(lo)], xs[np.asarray(hi)], fitted


class StepsFromValue:
    """The worker's value Q(s, pi(s, g), g) read as env steps from s to g.

    SoRB reads -Q as a step count because its worker earns -1 per step until it reaches the goal.
    goal_hrl's worker earns a distance-shaped reward instead (-||E(s') - g||^2 / d, divided by its
    running spread, discounted by low.gamma), whose value is no closed-form function of the steps
    to go: it depends on the path's latent geometry and on the reward normalisation of the moment.
    The conversion is therefore fitted, at each rebuild, to what replay shows: pairs (s_t, s_{t+j})
    of the same episode, j env steps apart, with the goal g = E_ema(s_{t+j}) the worker is trained
    to reach (HER goals are exactly such pairs). Steps are regressed on the value by isotonic
    (monotone) regression: a higher value never reads as more steps, whatever the noise. j is the
    replay's own step count, an upper bound on the shortest one, so the fit is an estimate of "how
    many steps a pair with this value took", not a lower bound.

    Outside the fitted range: values above the highest fitted one read as the fewest fitted steps;
    values below the lowest fitted one read as +inf (farther than any pair the fit has seen), so
    max_edge_steps must lie well inside fit_horizon."""

    def __init__(self, knots_value: np.ndarray, knots_steps: np.ndarray):
        self.knots_value = np.asarray(knots_value, dtype=np.float64)
        self.knots_steps = np.asarray(knots_steps, dtype=np.float64)

    @classmethod
    def fit(cls, values: np.ndarray, steps: np.ndarray) -> "StepsFromValue":
        lo, hi, fitted = isotonic_decreasing(values, steps)
        # each block is flat over [lo, hi]; linear between blocks (still non-increasing)
        return cls(np.stack([lo, hi], 1).reshape(-1), np.repeat(fitted, 2))

    @classmethod
    def discounted(cls, gamma: float, max_steps: int) -> "StepsFromValue":
        """SoRB's closed form for a worker paid -1 per step until it reaches its goal (reward=reach):
        V = -(1 - gamma^n) / (1 - gamma) after n steps, so n = log(1 + (1 - gamma) V) / log(gamma).
        Knots at n = max_steps..0 (values increasing); values below the last read as +inf. Unlike the
        fit, it counts the steps the worker expects to need, not the steps replay's paths took."""
        n = np.arange(int(max_steps), -1, -1, dtype=np.float64)
        return cls(-(1.0 - gamma ** n) / (1.0 - gamma), n)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        v = values.detach().double().cpu().numpy()
        steps = np.interp(v, self.knots_value, self.knots_steps)
        steps[v < self.knots_value[0]] = np.inf
        return torch.as_tensor(steps, dtype=torch.float32, device=values.device)

    def state(self) -> dict:
        return {"knots_value": torch.as_tensor(self.knots_value), "knots_steps": torch.as_tensor(self.knots_steps)}

    @classmethod
    def from_state(cls, state: dict) -> "StepsFromValue":
        return cls(state["knots_value"].numpy(), state["knots_steps"].numpy())


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by order; fine for continuous values)."""
    ra, rb = np.argsort(np.argsort(a)).astype(np.float64), np.argsort(np.argsort(b)).astype(np.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


# ----------------------------------------------------------------------------- shortest paths


def shortest_paths(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs shortest paths (Floyd-Warshall) of a directed graph given as an (N, N) weight
    matrix with +inf for missing edges. Returns (dist, next_hop): next_hop[i, j] is the node after
    i on a shortest path from i to j (j itself for a direct edge, -1 when j is unreachable)."""
    n = len(weights)
    dist = weights.clone().float()
    dist.fill_diagonal_(0.0)
    idx = torch.arange(n, device=dist.device)
    next_hop = torch.where(torch.isfinite(dist), idx.expand(n, n), torch.full_like(dist, -1, dtype=torch.long))
    for k in range(n):
        through = dist[:, k:k + 1] + dist[k:k + 1, :]
        better = through < dist
        dist = torch.where(better, through, dist)
        next_hop = torch.where(better, next_hop[:, k:k + 1].expand(n, n), next_hop)
    return dist, next_hop


def path_between(next_hop: torch.Tensor, i: int, j: int) -> list[int]:
    """Nodes of the shortest path from i to j, both included ([] when j is unreachable from i)."""
    if int(next_hop[i, j]) < 0:
        return []
    path = [int(i)]
    while path[-1] != j and len(path) <= len(next_hop):
        path.append(int(next_hop[path[-1], j]))
    return path


def plan_route(start_steps: torch.Tensor, dist: torch.Tensor, next_hop: torch.Tensor,
               target: int) -> tuple[list[int], float]:
    """The route from the current state to landmark `target`: enter the graph at the landmark i
    minimising start_steps[i] + dist[i, target] (steps from the state to i, +inf where no edge),
    then follow the shortest path. Returns (landmarks on the route, first to target; predicted
    steps), or ([], inf) when no route exists. Its first node is the subgoal (SoRB, DHRL)."""
    total = start_steps + dist[:, target]
    first = int(total.argmin())
    steps = float(total[first])
    if not np.isfinite(steps):
        return [], float("inf")
    return path_between(next_hop, first, target), steps


# ----------------------------------------------------------------------------- the graph


@dataclass
class LandmarkGraph:
    """One rebuild's result. Landmarks are kept as observations (not latents): their latents are
    re-derived with the current encoder whenever the graph is queried, so they do not go stale
    between rebuilds, and only the step counts (weights, dist) are frozen until the next one."""

    obs: dict  # landmark observations as stored in replay, {key: (N, ...) array}
    ref_goal: np.ndarray  # the task goal the landmarks were encoded under at the rebuild (edges, FPS)
    steps_fit: StepsFromValue  # the value -> steps conversion of the rebuild
    weights: torch.Tensor  # (N, N) edge weights in env steps, +inf where dropped
    dist: torch.Tensor  # (N, N) shortest-path steps
    next_hop: torch.Tensor  # (N, N) next node on a shortest path (-1: unreachable)
    built_at: int  # env step of the rebuild

    @property
    def xy(self) -> np.ndarray:
        """Where each landmark is in env goal space (its stored achieved goal)."""
        return self.obs["achieved_goal"]

    def __len__(self) -> int:
        return len(self.weights)

    def nearest(self, goal_xy: np.ndarray) -> int:
        """The landmark whose achieved goal is nearest `goal_xy` in env goal space."""
        return int(np.linalg.norm(self.xy - np.asarray(goal_xy)[None], axis=-1).argmin())

    def num_edges(self) -> int:
        finite = torch.isfinite(self.weights)
        return int(finite.sum() - finite.diagonal().sum())

    def state(self) -> dict:
        """As tensors, missing edges and unreachable pairs stored as -1 (checkpoints refuse inf: the
        divergence guard reads any non-finite number as a diverged run)."""
        def finite(t):
            return torch.where(torch.isfinite(t), t, torch.full_like(t, -1.0)).cpu()

        return {"obs": {k: torch.as_tensor(v) for k, v in self.obs.items()}, "ref_goal": torch.as_tensor(self.ref_goal),
                "steps_fit": self.steps_fit.state(), "weights": finite(self.weights), "dist": finite(self.dist),
                "next_hop": self.next_hop.cpu(), "built_at": int(self.built_at)}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device | str = "cpu") -> "LandmarkGraph | None":
        if state is None:
            return None
        def infinite(t):
            return torch.where(t < 0, torch.full_like(t, float("inf")), t).to(device)

        return cls({k: v.numpy() for k, v in state["obs"].items()}, state["ref_goal"].numpy(),
                   StepsFromValue.from_state(state["steps_fit"]), infinite(state["weights"]),
                   infinite(state["dist"]), state["next_hop"].to(device), int(state["built_at"]))


# ----------------------------------------------------------------------------- drawing

COLORS = {"free": (236, 236, 236), "wall": (70, 70, 70), "edge": (178, 204, 232), "landmark": (40, 90, 200),
          "route": (215, 40, 40), "start": (30, 160, 60), "goal": (245, 150, 0)}


def _disc(img: np.ndarray, center: np.ndarray, radius: float, color) -> None:
    h, w = img.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    img[(yy - center[1]) ** 2 + (xx - center[0]) ** 2 <= radius ** 2] = color


def _line(img: np.ndarray, a: np.ndarray, b: np.ndarray, color, width: int = 1) -> None:
    h, w = img.shape[:2]
    n = int(np.ceil(np.abs(b - a).max() * 2)) + 2
    pts = np.rint(a[None] + np.linspace(0.0, 1.0, n)[:, None] * (b - a)[None]).astype(np.int64)
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            x, y = pts[:, 0] + dx, pts[:, 1] + dy
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            img[y[ok], x[ok]] = color


def draw_plan(walls: np.ndarray, to_pixel, landmarks_xy: np.ndarray, edges: np.ndarray | None = None,
              route_xy: np.ndarray | None = None, start_xy=None, goal_xy=None, cell_px: int = 20) -> np.ndarray:
    """A (3, H, W) uint8 picture of a maze: walls, the graph's edges (pairs of landmark indices),
    landmarks, a route (start -> landmarks -> target), the start and the task goal.
    walls: (rows, cols) bool wall map; to_pixel(xy (n, 2)) -> (n, 2) pixel coordinates (x right,
    y down) at `cell_px` pixels per cell."""
    rows, cols = walls.shape
    img = np.empty((rows * cell_px, cols * cell_px, 3), dtype=np.uint8)
    img[:] = COLORS["free"]
    img[np.repeat(np.repeat(walls, cell_px, 0), cell_px, 1)] = COLORS["wall"]
    lm = to_pixel(np.asarray(landmarks_xy, dtype=np.float64)) if len(landmarks_xy) else np.zeros((0, 2))
    for i, j in (edges if edges is not None else []):
        _line(img, lm[i], lm[j], COLORS["edge"])
    for p in lm:
        _disc(img, p, cell_px * 0.1, COLORS["landmark"])
    if route_xy is not None and len(route_xy) > 1:
        pts = to_pixel(np.asarray(route_xy, dtype=np.float64))
        for a, b in zip(pts[:-1], pts[1:]):
            _line(img, a, b, COLORS["route"], width=2)
    if start_xy is not None:
        _disc(img, to_pixel(np.asarray(start_xy, dtype=np.float64)[None])[0], cell_px * 0.2, COLORS["start"])
    if goal_xy is not None:
        _disc(img, to_pixel(np.asarray(goal_xy, dtype=np.float64)[None])[0], cell_px * 0.2, COLORS["goal"])
    return img.transpose(2, 0, 1).copy()
