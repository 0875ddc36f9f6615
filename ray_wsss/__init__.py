"""ray-wsss: weakly supervised semantic segmentation on Ray.

Image-level labels in, pixel-level pseudo masks out: a classifier trained with Ray Train,
class activation maps and dense-CRF refinement on Ray Data, evaluation and an HTML report.
"""
__version__ = "0.1.0"
