"""XLA:CPU specifics: the native kernels (:mod:`.native`), the per-host choice
between them and XLA's ops (:mod:`.autotune`), and the malloc restart
(:mod:`.malloc`)."""
