"""Linear few-shot evaluation: a closed-form ridge regression on frozen features (paper §4.1).

The algorithm of big_vision's `evaluators/fewshot_lsr.py`, in numpy:

* each feature is standardised with the few-shot train set's mean and std
  (+1e-5); the test features with the same statistics;
* a constant feature of 100 is appended: a bias that is almost unregularised;
* targets are 2 * one_hot - 1;
* the ridge solution W = (XᵀX + λI)⁻¹ XᵀY (N >= D) or Xᵀ(XXᵀ + λI)⁻¹ Y (N < D)
  comes from one eigendecomposition (`eigh`) of XᵀX or XXᵀ, so a sweep over
  λ reuses it (`LinearFewShot.accuracy`);
* the prediction is the argmax of X_test W.
"""

import numpy as np

BIAS_FEATURE = 100.0  # big_vision's BIAS_CONSTANT
STD_EPSILON = 1e-5
DEFAULT_L2_REG = 2.0**10  # big_vision's fixed l2_reg


class LinearFewShot:
    """A ridge classifier fitted once per train set; `accuracy(...)` for any l2.

        solver = LinearFewShot(train_features, train_labels, num_classes)
        {l2: solver.accuracy(test_features, test_labels, l2) for l2 in (2.0**6, 2.0**10)}
    """

    def __init__(self, train_features, train_labels, num_classes=None):
        x = np.asarray(train_features, np.float64)
        labels = _class_ids(x, train_labels)
        if len(x) == 0:
            raise ValueError("No training examples: the few-shot train set is empty.")
        self.num_classes = int(num_classes or labels.max() + 1)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"Labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}.")
        self.mean = x.mean(axis=0, keepdims=True)
        self.std = x.std(axis=0, keepdims=True) + STD_EPSILON
        x = self._design(x)
        y = 2.0 * np.eye(self.num_classes)[labels] - 1.0
        # W = lhs diag(1 / (eigs + l2)) rhs, for either side of the identity
        # (XᵀX + λI)⁻¹Xᵀ = Xᵀ(XXᵀ + λI)⁻¹: the smaller Gram matrix is decomposed.
        if len(x) >= x.shape[1]:
            self.eigs, q = np.linalg.eigh(x.T @ x)
            self.lhs, self.rhs = q, q.T @ (x.T @ y)
        else:
            self.eigs, q = np.linalg.eigh(x @ x.T)
            self.lhs, self.rhs = x.T @ q, q.T @ y

    def _design(self, features):
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"Expected features (M, {self.mean.shape[1]}) like the train features, got {x.shape}."
            )
        x = (x - self.mean) / self.std
        return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)

    def weights(self, l2_reg=DEFAULT_L2_REG):
        """The (D + 1, classes) ridge solution for `l2_reg`; the last row is the bias."""
        return (self.lhs / (self.eigs + l2_reg)) @ self.rhs

    def predict(self, features, l2_reg=DEFAULT_L2_REG):
        return np.argmax(self._design(features) @ self.weights(l2_reg), axis=1)

    def accuracy(self, test_features, test_labels, l2_reg=DEFAULT_L2_REG):
        """Test accuracy for one l2, or {l2: accuracy} for a sequence of them (one decomposition)."""
        test_labels = _class_ids(np.asarray(test_features), test_labels, "test ")
        if np.ndim(l2_reg):
            return {float(l2): self.accuracy(test_features, test_labels, l2) for l2 in l2_reg}
        return float(np.mean(self.predict(test_features, l2_reg) == test_labels))


def _class_ids(features, labels, which=""):
    """Labels (N,) or (N, 1) as (N,) int64 class ids, or a one-line ValueError
    (one-hot labels would compare against predictions element by element)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # keras.datasets' class ids
        labels = labels[:, 0]
    if features.ndim != 2 or labels.shape != (len(features),):
        hint = " (one-hot? pass np.argmax(labels, axis=1))" if labels.ndim == 2 else ""
        raise ValueError(
            f"Expected {which}features (N, D) and {which}labels (N,) of class ids, got {features.shape} and "
            f"{labels.shape}{hint}."
        )
    return labels.astype(np.int64)


def linear_few_shot(train_features, train_labels, test_features, test_labels, num_classes=None,
                    l2_reg=DEFAULT_L2_REG):
    """Accuracy of the ridge classifier fitted on the train features (see the module docstring).

    `l2_reg` may be a sequence: then {l2: accuracy}, from one eigendecomposition.
    """
    return LinearFewShot(train_features, train_labels, num_classes).accuracy(test_features, test_labels, l2_reg)


def sample_shots(labels, shots, seed, num_classes=None):
    """{k: indices} of a few-shot train set with k examples per class, as big_vision.

    Each class's indices are permuted once with `np.random.default_rng(seed)`
    and the first k taken, so the sets are nested across k (the 5-shot set
    holds the 1-shot set). A class with fewer than k examples gives all it has.
    """
    labels = np.asarray(labels)
    num_classes = int(num_classes or labels.max() + 1)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return {k: np.concatenate([indices[:k] for indices in per_class]) for k in shots}
