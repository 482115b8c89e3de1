"""Watching AtP*'s QK fix: how far its recomputed attention patterns are from the model's own."""


def pattern_gaps(monkeypatch) -> list[float]:
    """The largest gap between the QK fix's recomputed pattern and the model's own, per later layer of each trace
    run after this call (the check itself still runs)."""
    import npeff_tl.tracing.attribution as attribution

    check, gaps = attribution._check_recomputed_pattern, []

    def measured(heads, pattern, after_target):
        rows = ~after_target[:, None, :, None]
        gaps.append(float(((heads.A - pattern.detach().double()).abs() * rows).max()))
        check(heads, pattern, after_target)

    monkeypatch.setattr(attribution, "_check_recomputed_pattern", measured)
    return gaps
