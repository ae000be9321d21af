"""A channel that records the exchanges of the channel it wraps: which layers synced, in order."""

from common.fedtan.bn_channel import BNChannel, GradSums, Moments


class RecordingChannel(BNChannel):
    """Records the exchanges of a channel it wraps."""

    def __init__(self, inner: BNChannel) -> None:
        self.inner, self.calls = inner, []

    def reduce_moments(self, layer: str, local: Moments) -> Moments:
        self.calls.append(("forward", layer))
        return self.inner.reduce_moments(layer, local)

    def reduce_grad_sums(self, layer: str, local: GradSums) -> GradSums:
        self.calls.append(("backward", layer))
        return self.inner.reduce_grad_sums(layer, local)
