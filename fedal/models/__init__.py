"""Models and the adapters that let strategies and learners use them."""
from fedal.models.nets import MLP, SmallCNN
from fedal.models.sklearn_adapter import SklearnClassifier
from fedal.models.torch_adapter import TorchClassifier

__all__ = ["MLP", "SmallCNN", "SklearnClassifier", "TorchClassifier", "build_model"]


def build_model(input_shape: tuple[int, ...], n_classes: int, **kwargs) -> TorchClassifier:
    """The default torch model for an input shape: a SmallCNN for (C, 28, 28), else an MLP.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one input (``Dataset.input_shape``).
    n_classes : int
        Number of classes.
    **kwargs
        Go to :class:`TorchClassifier` (epochs, lr, batch_size, seed, ...).
    """
    if len(input_shape) == 3 and input_shape[1:] == (28, 28):
        channels = input_shape[0]
        return TorchClassifier(lambda: SmallCNN(channels, n_classes), n_classes, **kwargs)
    n_features = 1
    for s in input_shape:
        n_features *= int(s)
    return TorchClassifier(lambda: MLP(n_features, n_classes), n_classes, **kwargs)
