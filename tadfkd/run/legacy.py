"""A run's identity as earlier versions wrote it into checkpoints, in today's form, so that their
runs resume (``checks.check_same_run``).

Before loss terms were objects, a method named its losses from closed menus: ``method.weights``
(term name -> weight), ``method.student_loss`` and ``method.adversarial`` (names),
``method.temperature`` and ``method.detach_teacher`` (shared by the terms). Today each term is
a ``_target_`` node with its own options (``conf/method/``); ``current_form`` rewrites the old
keys into the keys the same method composes to now. A setting added to the identity later
(``ADDED``) is absent from older checkpoints; it is read as the value that reproduces what they
computed, so that the refusal to resume names the override that continues them exactly.
"""

from __future__ import annotations

from typing import Any

TERMS = "tadfkd.distillation.terms."
# the former menus: name -> today's class (in tadfkd.distillation.terms)
STUDENT_LOSSES = {"l1": "StudentL1", "kl": "StudentKL", "kl_element_mean": "StudentKLElementMean"}
ADVERSARIAL = {
    "js": "AdversarialJS",
    "l1": "AdversarialL1",
    "kl": "AdversarialKL",
    "kl_element_mean": "AdversarialKLElementMean",
}
GENERATOR_TERMS = {
    "bn": "BNStatistics",
    "tv": "TotalVariation",
    "l2": "L2Prior",
    "class_prior": "ClassPrior",
    "activation": "Activation",
    "info_entropy": "InformationEntropy",
    "balance": "ClassBalance",
}
# the former keys shared by the terms, and their defaults when a method left them out
SHARED = {
    "method.student_loss": "l1",
    "method.adversarial": "js",
    "method.temperature": 3.0,
    "method.detach_teacher": False,
}
WEIGHTS = "method.weights."
# settings added to the run identity later -> what a run written before them computed: resuming
# such a run is refused with today's default until the override is given
# (e.g. speed.depthwise_output=false)
ADDED = {
    "speed.batch_norm_kernel": False,
    "speed.depthwise_output": False,
    "speed.fused_generation": False,
    "speed.fused_pooling": False,
    "speed.mixture_kernel": False,
    "speed.output_conv_kernel": False,
    "speed.phased_upsampling": False,
    "speed.single_channel_conv": False,
    "speed.single_channel_training": False,
    "speed.winograd_conv": False,
    "speed.winograd_tile": 2,
}
UNTEMPERED = "l1"  # the L1 losses compare raw logits: no temperature


def current_form(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` (flattened ``a.b.c`` keys, ``checks.run_identity``) with a method in the
    former form rewritten as ``method.student_loss`` and ``method.generator_terms`` nodes, and
    the settings added since it was written (``ADDED``) at the values that reproduce what it
    computed; an identity in today's form is returned as it is."""
    identity = {**ADDED, **identity}  # a value the identity has wins
    if "method.student_loss" not in identity:
        return identity
    shared = {key: identity.get(key, default) for key, default in SHARED.items()}
    current = {
        key: value
        for key, value in identity.items()
        if key not in SHARED and not key.startswith(WEIGHTS)
    }
    student = shared["method.student_loss"]
    current["method.student_loss._target_"] = TERMS + STUDENT_LOSSES[student]
    if student != UNTEMPERED:
        current["method.student_loss.temperature"] = shared["method.temperature"]
    for key, weight in identity.items():
        if key.startswith(WEIGHTS):
            term = key.removeprefix(WEIGHTS)
            node = f"method.generator_terms.{term}."
            current.update(_term(term, shared, node))
            current[node + "weight"] = weight
    return current


def _term(term: str, shared: dict[str, Any], node: str) -> dict[str, Any]:
    """The ``_target_`` and options of the former term ``term`` under ``node``."""
    if term != "adversarial":
        return {node + "_target_": TERMS + GENERATOR_TERMS[term]}
    kind = shared["method.adversarial"]
    options = {node + "_target_": TERMS + ADVERSARIAL[kind]}
    if kind != UNTEMPERED:
        options[node + "temperature"] = shared["method.temperature"]
    options[node + "detach_teacher"] = shared["method.detach_teacher"]
    return options
