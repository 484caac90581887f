"""Measuring models honestly: top-1/top-5 (:mod:`.evaluate`), a decomposed model against its
original on the same inputs (:mod:`.compare`: accuracy, output error, latency), side-by-side
timing (:mod:`.clock`) and figures (:mod:`.plots`)."""
