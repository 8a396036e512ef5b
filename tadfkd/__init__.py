"""TA-DFKD: teacher-agnostic data-free knowledge distillation."""

__version__ = "0.1.0"
