"""A small synthetic world in which the whole method runs on a laptop CPU.

Six shapes, each with a spurious background texture (:mod:`.render`), written as a biased training
split, an unbiased validation split and a spurious set in Spurious ImageNet's layout
(:mod:`.dataset`), with their label set (:mod:`.labels`, ``--labels world``), timm classifiers trained
on them (:mod:`.classifiers`) and two small text-to-image models, v and epsilon prediction
(:mod:`.text_to_image`). :mod:`.models`
says where the built models are; :mod:`.build`, :mod:`.demo` and :mod:`.evidence` are the code of
``spurgen world build``, ``spurgen demo`` and ``spurgen world evidence``.
"""
