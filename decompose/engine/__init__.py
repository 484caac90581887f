"""Model surgery that knows no method: tracing shapes and multiply-adds (:mod:`.trace`),
replacing modules by name (:mod:`.surgery`), folding BatchNorms into convs (:mod:`.fold`) and
the memory layout of a whole model (:mod:`.layout`)."""
