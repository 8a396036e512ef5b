"""The names of everything a run measures, defined once: per-epoch metric keys (the W&B keys and
the keys of ``results.json``'s ``history``), which of them are summed over an epoch and which
averaged, and the fields of ``results.json`` with their meaning.

Accuracies and rates are fractions in [0, 1]; losses are in the units of their term; times in
seconds; counters are counts per epoch.
"""

from __future__ import annotations

# -- per-epoch metrics --------------------------------------------------------------------------
EPOCH = "epoch"  # 1-based epoch number, the step of every per-epoch metric
STUDENT_ACC = "acc/student"  # student test accuracy after the epoch; None without a test set
TEACHER_ACC = "acc/teacher"  # teacher test accuracy, logged once at the start
LR_STUDENT = "lr/student"  # student learning rate during the epoch
EPOCH_SECONDS = "time/epoch_s"  # wall time of the epoch (training, health, evaluation)
SELECTION_RATE = "selection/rate"  # kept / generated samples of the epoch's student batches


def loss_key(term: str) -> str:
    """The metric key of a loss term (its unweighted epoch mean), e.g. ``loss/adversarial``."""
    return f"loss/{term}"


STUDENT_LOSS = loss_key("student")
GENERATOR_LOSS = loss_key("generator")

# Data-free health signals on a fresh generated batch (fractions; no real data needed).
TEACHER_CLASS_ENTROPY = "health/teacher_class_entropy"  # of the arg-max histogram, / log K
TEACHER_CONFIDENCE = "health/teacher_confidence"  # mean max softmax probability
AGREEMENT = "health/agreement"  # teacher-student arg-max agreement
# Every data-free health signal of an epoch (the three above and the selection rate), in the
# words the report's plots use.
HEALTH = {
    TEACHER_CLASS_ENTROPY: "teacher class entropy (fraction of log K)",
    TEACHER_CONFIDENCE: "teacher confidence (mean max probability)",
    AGREEMENT: "teacher-student agreement (fraction)",
    SELECTION_RATE: "selection rate (fraction kept)",
}

# Averaged per student step: generated batches that contributed to a student batch.
BATCHES_USED = "selection/batches_used"
# Summed over an epoch (counts), not averaged; each is reported, 0 when it never happened.
GENERATED = "selection/generated"  # samples generated for student batches
KEPT = "selection/kept"  # of which kept by the selection
SHORT_STUDENT_BATCHES = "selection/short_student_batches"  # student batches under batch_size
SKIPPED_GENERATOR_STEPS = "selection/skipped_generator_steps"  # fewer than 2 samples kept
SKIPPED_STUDENT_STEPS_NONFINITE = "nonfinite/skipped_student_steps"
SKIPPED_GENERATOR_STEPS_NONFINITE = "nonfinite/skipped_generator_steps"
NONFINITE_STOPPED = "nonfinite/stopped"  # logged once when a run stops on a non-finite loss
COUNTERS = (
    SHORT_STUDENT_BATCHES,
    SKIPPED_GENERATOR_STEPS,
    SKIPPED_STUDENT_STEPS_NONFINITE,
    SKIPPED_GENERATOR_STEPS_NONFINITE,
)
# Summed for the selection rate, then dropped from the epoch's metrics.
RATE_PARTS = (GENERATED, KEPT)
SUMMED = (*COUNTERS, *RATE_PARTS)

# -- results.json -------------------------------------------------------------------------------
LAST_K = 10  # student_last10_acc averages this many final evaluations
FINAL_ACC = "student_final_acc"  # after the last epoch
LAST_K_ACC = "student_last10_acc"  # mean of the last LAST_K evaluations (all, if fewer)
BEST_ACC = "student_best_acc"  # best epoch: model selection on the test set (optimistic)
TEACHER_ACC_FIELD = "teacher_acc"  # teacher test accuracy
EPOCH_ACCS = "epoch_accs"  # student test accuracy after every epoch
HISTORY = "history"  # one dict of per-epoch metrics (the keys above) per epoch
WALL_TIME = "wall_time_s"  # seconds from start to results, this invocation
# What each accuracy field is, in the words every table and plot uses.
ACCURACY_FIELDS = {
    FINAL_ACC: "final",
    LAST_K_ACC: f"mean of last {LAST_K} epochs",
    BEST_ACC: "best epoch (test-set selection)",
}
# The labels of a run, as results.json names them.
LABEL_FIELDS = ("dataset", "teacher", "teacher_arch", "student", "method", "seed", "epochs")
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"


def last_k_label(epochs: int) -> str:
    """What ``student_last10_acc`` averages in a run of ``epochs`` epochs."""
    k = min(LAST_K, epochs)
    return "final epoch" if k == 1 else f"mean of last {k} epochs"
