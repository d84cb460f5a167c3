"""``attnkit.diffusion.scenes`` is :mod:`attnkit.tasks.scenes` (the procedural scenes moved to the
tasks, where the vision tasks use them without the diffusion extra); this name stays, as the very
same module object, for the diffusion code and its users."""

import sys

from attnkit.tasks import scenes as _scenes

sys.modules[__name__] = _scenes
