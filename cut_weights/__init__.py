from cut_weights.cut import CutError, CutOptions, cut

__all__ = ["CutError", "CutOptions", "cut"]
