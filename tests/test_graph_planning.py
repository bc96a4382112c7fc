"""goal_hrl's graph planning (agent.planning.method=graph): farthest-point landmarks, the value read
as env steps, edges cut off, shortest routes and their first landmark as the subgoal, rebuilds in
training, the plan drawn over the maze, exact resume, and refusal where there is no task goal."""

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, train_run
from latentrl.agents.landmarks import (LandmarkGraph, StepsFromValue, farthest_point_sampling, path_between,
                                       plan_route, shortest_paths)
from latentrl.config import ConfigError
from test_bad_input import cli
from test_goal_hrl import BAD_CONFIG, FAST, build_agent, collect
from test_resume import EXACT, straight_and_resumed

INF = float("inf")
# small graphs, rebuilt often; a long cut-off so that even barely trained values give routes
GRAPH = ["agent.planning.method=graph", "agent.planning.graph.n_landmarks=20", "agent.planning.graph.sample_size=200",
         "agent.planning.graph.rebuild_every=50", "agent.planning.graph.fit_pairs=256",
         "agent.planning.graph.max_edge_steps=200", "agent.planning.graph.fit_horizon=400"]


def euclidean_weights(xy: np.ndarray, cutoff: float, blocked=()) -> torch.Tensor:
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    d[d > cutoff] = INF
    for i, j in blocked:  # a wall between two points
        d[i, j] = d[j, i] = INF
    return torch.as_tensor(d, dtype=torch.float32)


# ----------------------------------------------------------------------------- units
def test_shortest_route_on_hand_made_landmarks_starts_with_its_first_node():
    # a U: down the left side, across the bottom, up the right side; a wall between the two tops
    xy = np.array([[0, 2], [0, 1], [0, 0], [1, 0], [2, 0], [2, 1], [2, 2]], dtype=np.float64)
    weights = euclidean_weights(xy, cutoff=1.2, blocked=[(0, 6), (1, 5)])  # unit steps, no diagonals
    dist, next_hop = shortest_paths(weights)
    assert path_between(next_hop, 0, 6) == [0, 1, 2, 3, 4, 5, 6]
    assert dist[0, 6] == pytest.approx(6.0)  # around the U, not through the wall
    assert path_between(next_hop, 6, 2) == [6, 5, 4, 3, 2]
    # from a state 1 step from landmark 1 and 2.5 from 2, the route enters at 1 and its first node is 1
    start = torch.tensor([INF, 1.0, 2.5, INF, INF, INF, INF])
    route, steps = plan_route(start, dist, next_hop, target=6)
    assert route == [1, 2, 3, 4, 5, 6] and steps == pytest.approx(6.0)
    # a shortcut from the state straight to landmark 4 wins when it is shorter
    route, steps = plan_route(torch.tensor([INF, 1.0, 2.0, INF, 1.5, INF, INF]), dist, next_hop, target=6)
    assert route == [4, 5, 6] and steps == pytest.approx(3.5)
    assert plan_route(torch.full((7,), INF), dist, next_hop, 6) == ([], INF)  # no edge from the state: no route


def test_agent_subgoal_is_the_first_landmark_of_the_route(monkeypatch):
    """Through the agent: the graph is hand-made over real maze observations, the value is read as
    (minus) the euclidean distance, and the goal the worker gets is the first route landmark's latent
    encoded under the episode's task goal (absolute goals: exactly that latent)."""
    agent, env = build_agent(*GRAPH, "agent.high.goal_space=absolute", "agent.planning.graph.max_edge_steps=1.2",
                             "agent.planning.graph.fit_horizon=3", env="pointmaze")
    obs = env.reset(seed=0)[0]
    xy = np.array([[0, 2], [0, 1], [0, 0], [1, 0], [2, 0], [2, 1], [2, 2]], dtype=np.float64)
    landmarks = {k: np.repeat(np.asarray(v)[None], len(xy), 0) for k, v in obs.items()}
    landmarks["observation"][:, :2] = landmarks["achieved_goal"] = xy
    weights = euclidean_weights(xy, 1.2, blocked=[(0, 6), (1, 5)])
    dist, next_hop = shortest_paths(weights)
    minus_steps = StepsFromValue(np.array([-100.0, 0.0]), np.array([100.0, 0.0]))  # steps = -value
    agent.graph = LandmarkGraph(landmarks, obs["desired_goal"], minus_steps, weights, dist, next_hop, built_at=0)
    here = np.array([-0.3, 2.3])  # the state: 0.42 from landmark 0, the others beyond the cut-off (1.2)
    monkeypatch.setattr(agent, "goal_values", lambda h, z: -torch.as_tensor(np.linalg.norm(xy - here, axis=-1),
                                                                            dtype=torch.float32))
    obs = {**obs, "desired_goal": np.array([2.1, 2.2])}  # nearest landmark: 6
    h, g = agent.goal_encoder(agent.obs_tensor(obs))
    g_start = agent.target_goals(agent.obs_tensor(obs))[1]
    u, goal = agent.choose_goal(h, g, g_start, explore=True, obs=obs)
    latents = agent.target_goals(agent._under_goal(landmarks, obs["desired_goal"]))[1]
    assert torch.equal(goal[0], latents[0])  # route 0 -> 1 -> ... -> 6 begins at landmark 0
    assert agent.env_stats["goal/plan_length"] == [7] and agent.env_stats["goal/plan_used"] == [1.0]
    # within one window of the target landmark, the manager finishes the way
    here = xy[6] + 0.01
    agent.choose_goal(h, g, g_start, explore=True, obs=obs)
    assert agent.env_stats["goal/plan_used"][-1] == 0.0
    _, goal = agent.choose_goal(h, g, g_start, explore=False, obs=obs)
    assert torch.equal(goal, agent.high.act(h, explore=False))


def test_edges_over_the_cutoff_are_dropped(monkeypatch):
    agent, env = build_agent(*GRAPH, "agent.planning.graph.max_edge_steps=5", "agent.planning.graph.fit_horizon=20",
                             env="pointmaze")
    collect(agent, env, 400)
    n = 20
    raw_steps = torch.as_tensor(np.random.default_rng(0).uniform(1.0, 12.0, (n, n)), dtype=torch.float32)
    # the value is minus the steps, and the fit sees exactly that relation
    monkeypatch.setattr(agent, "pairwise_values", lambda h, z: -raw_steps)
    monkeypatch.setattr(agent, "fit_pairs", lambda rng, k, horizon: (-np.arange(1.0, 21.0), np.arange(1.0, 21.0)))
    metrics = agent.rebuild_graph(step=400)
    w = agent.graph.weights
    off = ~torch.eye(n, dtype=torch.bool)
    kept = (raw_steps <= 5.0) & off
    assert torch.equal(torch.isfinite(w) & off, kept)  # an edge exists exactly where it reads <= 5 steps
    assert torch.allclose(w[kept], raw_steps[kept])
    assert metrics["goal/graph_edges"] == float(kept.sum()) and metrics["goal/graph_nodes"] == n
    assert (agent.graph.dist <= w).all() and (torch.diagonal(w) == 0).all()


def test_farthest_point_sampling_spreads_its_picks():
    rng = np.random.default_rng(0)
    centres = rng.uniform(-10, 10, (6, 3))
    points = np.concatenate([c + 0.05 * rng.standard_normal((200, 3)) for c in centres])
    points = torch.as_tensor(points, dtype=torch.float32)
    picked = farthest_point_sampling(points, 6)
    assert len(set(picked.tolist())) == 6
    assert sorted(set(i // 200 for i in picked.tolist())) == list(range(6))  # one pick per cluster
    picked = farthest_point_sampling(points, 40)
    chosen = points[picked]
    pairwise = torch.cdist(chosen, chosen) + torch.eye(40) * 1e9
    covering = torch.cdist(points, chosen).min(1).values.max()
    assert covering <= pairwise.min() + 1e-5  # every point is within the picks' separation of a pick
    random_picks = points[torch.as_tensor(rng.choice(len(points), 40, replace=False))]
    random_covering = torch.cdist(points, random_picks).min(1).values.max()
    assert covering < random_covering


def test_value_to_steps_conversion_is_monotone():
    rng = np.random.default_rng(0)
    steps = rng.integers(1, 41, 2000).astype(np.float64)
    values = -0.1 * steps + 0.3 * rng.standard_normal(2000)  # noisy: neighbouring steps overlap
    fit = StepsFromValue.fit(values, steps)
    grid = torch.linspace(float(values.min()), float(values.max()), 500)
    read = fit(grid).numpy()
    assert np.all(np.diff(read) <= 1e-9)  # a higher value never reads as more steps
    assert read[0] > 30 and read[-1] < 5  # and it spans the range of the data
    np.testing.assert_allclose(fit(torch.tensor([-2.0])).item(), 20.0, atol=2.5)
    assert fit(torch.tensor([float(values.min()) - 1])).item() == INF  # below anything seen: unreachable
    assert fit(torch.tensor([float(values.max()) + 1])).item() == read[-1]  # above: the fewest steps
    again = StepsFromValue.from_state(fit.state())
    assert torch.equal(again(grid), fit(grid))


def test_discounted_steps_invert_the_value_of_a_minus_one_per_step_worker():
    gamma = 0.95
    read = StepsFromValue.discounted(gamma, 40)
    n = torch.tensor([0.0, 1.0, 5.0, 20.0, 39.0])
    values = -(1 - gamma ** n) / (1 - gamma)  # what -1 per step for n steps, then 0, is worth
    torch.testing.assert_close(read(values), n)
    assert read(torch.tensor([-19.9])).item() == INF  # beyond 40 steps: unreachable
    assert read(torch.tensor([0.5])).item() == 0.0  # an optimistic value above 0: no steps


def test_rebuild_reads_steps_in_closed_form_with_steps_discount():
    agent, env = build_agent(*GRAPH, "agent.reward=reach", "agent.planning.graph.steps=discount",
                             env="pointmaze")
    collect(agent, env, 300)
    agent.rebuild_graph(300)
    expected = StepsFromValue.discounted(agent.low.gamma, 400)  # GRAPH's fit_horizon
    np.testing.assert_array_equal(agent.graph.steps_fit.knots_value, expected.knots_value)
    np.testing.assert_array_equal(agent.graph.steps_fit.knots_steps, expected.knots_steps)


def test_graph_settings_are_validated():
    with pytest.raises(BAD_CONFIG, match="agent.planning.graph.n_landmarks must be >= 2"):
        build_agent("agent.planning.method=graph", "agent.planning.graph.n_landmarks=1", env="pointmaze")
    with pytest.raises(BAD_CONFIG, match="agent.planning.graph.sample_size"):
        build_agent("agent.planning.method=graph", "agent.planning.graph.sample_size=10", env="pointmaze")
    with pytest.raises(BAD_CONFIG, match="agent.planning.graph.fit_horizon"):
        build_agent("agent.planning.method=graph", "agent.planning.graph.fit_horizon=20", env="pointmaze")
    with pytest.raises(BAD_CONFIG, match="set agent.reward=reach or agent.planning.graph.steps=fit"):
        build_agent("agent.planning.method=graph", "agent.planning.graph.steps=discount", env="pointmaze")
    with pytest.raises(BAD_CONFIG, match="agent.planning.graph.steps='x' is unknown: .* fit, discount"):
        build_agent("agent.planning.method=graph", "agent.planning.graph.steps=x", env="pointmaze")
    build_agent("agent.planning.method=graph", "agent.planning.graph.steps=discount", "agent.reward=reach",
                env="pointmaze")
    with pytest.raises(BAD_CONFIG, match="agent.planning.method=graph .* has none"):
        build_agent("agent.planning.method=graph")  # pendulum: no task goal


# ----------------------------------------------------------------------------- runs
def test_graph_planning_runs_on_pointmaze_and_logs_its_plan(tmp_path):
    train_run(["env=pointmaze", "agent=goal_hrl", *FAST, *GRAPH, *TINY, "trainer.eval_every=150",
               "trainer.eval_episodes=1", "env.max_episode_steps=100"], tmp_path)
    logged = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    keys = set().union(*logged)
    for key in ("goal/plan_length", "goal/plan_used", "goal/plan_steps", "goal/graph_rebuild_s", "goal/graph_nodes",
                "goal/graph_edges", "goal/graph_fit_corr", "eval/success_rate"):
        assert key in keys, key
    assert max(e.get("goal/plan_length", 0) for e in logged) >= 1
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("goal/landmark_plan")
    assert [im.step for im in images] == [150, 300]  # drawn at every evaluation
    assert images[0].width == images[0].height == 160  # UMaze: 5 x 5 cells of 32 pixels


def test_resume_is_exact_with_graph_planning(tmp_path):
    # rebuilds at steps 101 (before the split at 110) and 151, 201 (after it); mid-episode and mid-window
    overrides = ["env=pointmaze", "agent=goal_hrl", *FAST, *GRAPH, "agent.k=7", *EXACT]
    straight, split = straight_and_resumed(tmp_path, overrides, 220, 110)
    assert straight["eval/return_mean"] == split["eval/return_mean"]
    graph = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["agent"]["extra"]["graph"]
    assert graph["built_at"] == 201 and graph["weights"].shape == (20, 20)
    logged = [json.loads(ln) for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert max(e.get("goal/plan_used", 0) for e in logged) > 0  # the routes did choose subgoals


def test_graph_planning_on_an_env_without_task_goal_is_one_line():
    code, out = cli("env=pendulum", "agent=goal_hrl", "agent.planning.method=graph", *TINY)
    assert code == 2 and "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "agent.planning.method=graph" in errors[0] and "sample or cem" in errors[0]
