"""Development tooling, not part of the product (not in the wheel or the image): the fleet on
one machine, the main job's local set-up, the demo and test images and the keep-alive backend.
Used by scripts/, the tests and bench/."""
