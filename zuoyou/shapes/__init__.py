"""ShapesWorld v1: the built-in synthetic image-text world (numpy + Pillow only).

See ``shared/specs/shapes-world.md`` for the contract.  Submodules:

* :mod:`.world` - palette, shapes, sizes, scenes, sampler, renderer, relations;
* :mod:`.language` - GenEval-style prompts and checkers, captions, questions,
  canonical descriptions;
* :mod:`.judge` - the scene parser for any 64 x 64 RGB image.
"""

from .judge import classify_pixels, parse_image
from .language import (CATEGORIES, NUMBERS, QUESTION_TYPES, Prompt, all_prompts,
                       answer_question, answers_match, caption, check, describe,
                       parse_description, parse_prompt, plural, sample_prompt,
                       sample_question, scene_for_prompt)
from .world import (CANVAS, COLORS, RELATIONS, SHAPES, SIZES, Obj, Scene, boxes_ok,
                    place_scene, relations, render, render_image, sample_scene,
                    shape_mask)

__all__ = [
    "CANVAS", "COLORS", "RELATIONS", "SHAPES", "SIZES", "Obj", "Scene", "boxes_ok",
    "place_scene", "relations", "render", "render_image", "sample_scene", "shape_mask",
    "CATEGORIES", "NUMBERS", "QUESTION_TYPES", "Prompt", "all_prompts",
    "answer_question", "answers_match", "caption", "check", "describe",
    "parse_description", "parse_prompt", "plural", "sample_prompt", "sample_question",
    "scene_for_prompt", "classify_pixels", "parse_image",
]
