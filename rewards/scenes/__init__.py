"""The scenes task: a tiny procedural text-to-image task (16 x 16 RGB, prompts 'a <colour> <shape>').

The image analogue of the 2-D task (`rewards.toy2d`): a data source whose reward has a body, a rare high tail
(large objects) and a failure region (washed-out or wrong-colour objects). See `rewards.scenes.render` for the
data and `rewards.scenes.reward` for the reward's formula.
"""

from rewards.scenes.prompts import COLOURS, PROMPTS, SHAPES, Prompt, all_prompts, parse_prompt
from rewards.scenes.render import KINDS, SAMPLE_SHAPE, draw_scenes, render, sample_scenes
from rewards.scenes.reward import FAILURE_LEVEL, TAIL_LEVEL, SceneParts, SceneReward, scene_parts, scene_reward

__all__ = [
    "COLOURS", "SHAPES", "PROMPTS", "Prompt", "all_prompts", "parse_prompt",
    "KINDS", "SAMPLE_SHAPE", "render", "draw_scenes", "sample_scenes",
    "TAIL_LEVEL", "FAILURE_LEVEL", "SceneParts", "SceneReward", "scene_parts", "scene_reward",
]
