"""Shared code of the book *Adversarial Robustness, Run and Measured*.

Modules, one idea each: :mod:`config` (profiles, seeds, device, cache folder), :mod:`checks`
(argument and threat-model checks), :mod:`data`, :mod:`models`, :mod:`attacks` (a package: FGSM,
PGD, APGD, Carlini & Wagner, noise), :mod:`train` (the loop), :mod:`augment` (random shifts of
the digits), :mod:`objectives`, :mod:`defences` and :mod:`trades` (what the loop minimises), :mod:`overfitting`, :mod:`evaluate`, :mod:`robustness`,
:mod:`cache` (trained models on disk), :mod:`zoo` (the book's model recipes), :mod:`energy`,
:mod:`plot`, :mod:`widgets`; :mod:`certify` (interval bounds and IBP training), :mod:`verify`
(exact verification as a MILP) and :mod:`smoothing` (randomized smoothing). Every chapter imports from here, so the book and the library never
disagree.
"""

__version__ = "0.1.0"
