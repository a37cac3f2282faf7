"""raysemi: semi-supervised brain tumour segmentation on Ray (teacher-student, uncertainty curriculum)."""

__version__ = "0.1.0"
