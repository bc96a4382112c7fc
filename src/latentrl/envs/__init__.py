from latentrl.envs.make_env import episode_seed, is_pixel_space, make_env

__all__ = ["make_env", "episode_seed", "is_pixel_space"]
