"""The built-in shapes world: scenes and captions, a programmatic verifier reward, the demo.

Its rewards (``"shapes"``, ``"shapes_clip"``, :mod:`diffalign.shapes.reward`) are registered through the
``rewards`` entry points of diffalign's package metadata: ``rewards.load("shapes")`` finds them without this
package being imported first.
"""

from diffalign.shapes.reward import CLIP_DIR, ShapesReward, shapes_clip


__all__ = ["CLIP_DIR", "ShapesReward", "shapes_clip"]
