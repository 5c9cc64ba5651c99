"""Data: accepted forms and clear errors for empty or inconsistent data."""

import numpy as np
import pytest
from mindspore import Tensor

from lightms.trainer.data import DataSource
from conftest import batches_of, fresh_model, make_data, quiet_trainer


def _no_cpp_trace(error):
    assert "C++" not in str(error.value)


def test_no_training_data():
    with pytest.raises(ValueError, match="needs training data") as error:
        quiet_trainer(max_epochs=1).fit(fresh_model())
    _no_cpp_trace(error)


def test_empty_dataset():
    with pytest.raises(ValueError, match="yielded no batches") as error:
        quiet_trainer(max_epochs=1).fit(fresh_model(), [])
    _no_cpp_trace(error)


def test_empty_mindspore_dataset():
    from mindspore import dataset as msds

    x, y = make_data(4)
    empty = msds.NumpySlicesDataset({"x": x, "y": y}, shuffle=False).batch(8, drop_remainder=True)
    with pytest.raises(ValueError, match="no batches"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), empty)


def test_batch_structure_changing_mid_epoch():
    x, y = make_data(24)
    batches = batches_of(x, y, 8)
    batches[2] = (x[16:24], y[16:24], y[16:24])  # an extra element
    with pytest.raises(ValueError, match="batch 2: the batch structure changed") as error:
        quiet_trainer(max_epochs=1).fit(fresh_model(), batches)
    _no_cpp_trace(error)
    batches = batches_of(x, y, 8)
    batches[1] = (x[8:16].astype(np.float16), y[8:16])  # a different dtype
    with pytest.raises(ValueError, match="batch 1: the batch structure changed"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), batches)


def test_a_namedtuple_batch_is_refused_with_what_to_yield_instead():
    import collections

    Pair = collections.namedtuple("Pair", "x y")
    x, y = make_data(16)
    with pytest.raises(TypeError, match=r"train_dataloaders, batch 0: a batch is a namedtuple \(Pair\).*tuple or a dict"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), [Pair(bx, by) for bx, by in batches_of(x, y, 8)])


def test_data_that_is_not_batches():
    with pytest.raises(TypeError, match="train_dataloaders must be"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), 42)
    with pytest.raises(TypeError, match="iterator"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), iter([]))
    with pytest.raises(TypeError, match="batch must be a tuple, list or dict"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), [("a", "b")])


def test_limits_and_lookahead():
    x, y = make_data(40)
    source = DataSource(batches_of(x, y, 4), "train_dataloaders")
    indices = [(b.index, b.is_last, b.size) for b in source.batches(3)]
    assert indices == [(0, False, 4), (1, False, 4), (2, True, 4)]
    assert [b.index for b in source.batches(0.5)] == [0, 1, 2, 3, 4]

    class NoLength:
        def __iter__(self):
            return iter(batches_of(x, y, 16))

    unsized = DataSource(NoLength(), "train_dataloaders")
    assert [(b.is_last, b.size) for b in unsized.batches()] == [(False, 16), (False, 16), (True, 8)]
    with pytest.raises(ValueError, match="fraction"):
        list(unsized.batches(0.5))


def test_mindspore_dataset_is_reshuffled_every_epoch_and_limits_keep_epochs_aligned():
    from mindspore import dataset as msds

    msds.config.set_seed(3)
    values = np.arange(12, dtype=np.float32).reshape(12, 1)
    dataset = msds.NumpySlicesDataset({"x": values}, shuffle=True).batch(3)
    msds.config.set_seed(3)
    expected_iterator = msds.NumpySlicesDataset({"x": values}, shuffle=True).batch(3).create_tuple_iterator(
        num_epochs=3)
    expected = [[row[0].asnumpy().ravel().tolist() for row in expected_iterator] for _ in range(3)]
    assert expected[0] != expected[1]  # MindSpore itself reshuffles between epochs of one iterator
    source = DataSource(dataset, "train_dataloaders")
    first = [b.data[0].asnumpy().ravel().tolist() for b in source.batches()]
    partial = [b.data[0].asnumpy().ravel().tolist() for b in source.batches(2)]  # stops early
    third = [b.data[0].asnumpy().ravel().tolist() for b in source.batches()]
    assert first == expected[0]
    assert partial == expected[1][:2]
    assert third == expected[2]


def test_resuming_mid_epoch_on_a_custom_iterable_warns():
    x, y = make_data(16)

    class Custom:
        def __iter__(self):
            return iter(batches_of(x, y, 4))

    with pytest.warns(UserWarning, match="exact only if iterating it yields the same batches"):
        DataSource(Custom(), "train_dataloaders").resume_at(0, 2)
    source = DataSource(batches_of(x, y, 4), "train_dataloaders")
    source.resume_at(0, 2)  # a list is positioned exactly: no warning
    assert [b.index for b in source.batches()] == [2, 3]


def test_a_batch_without_a_batch_dimension():
    x, y = make_data(16)
    with pytest.raises(ValueError, match="batch 0: batch elements must have a batch dimension") as error:
        quiet_trainer(max_epochs=1).fit(fresh_model(), [(np.array(x[0, 0]), y[:1])])
    _no_cpp_trace(error)


def test_numpy_and_tensor_batches_of_the_same_structure_mix():
    from mindspore import Tensor

    x, y = make_data(32)
    batches = batches_of(x, y, 8)
    batches[1] = (Tensor(batches[1][0]), Tensor(batches[1][1]))  # Tensors between numpy batches
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(fresh_model(), batches)
    assert trainer.global_step == 4


class RefillingLoader:
    """Yields every batch in the same two arrays, refilled in place (as some fast loaders do)."""

    def __init__(self, batches, sized: bool):
        self.batches, self.sized = batches, sized

    def __iter__(self):
        x, y = np.empty_like(self.batches[0][0]), np.empty_like(self.batches[0][1])
        for bx, by in self.batches:
            x[...], y[...] = bx, by
            yield x, y

    def __len__(self):
        if not self.sized:
            raise TypeError("no length")  # len() of an object whose __len__ raises TypeError: no length
        return len(self.batches)


@pytest.mark.parametrize("sink_size", [1, 4])
@pytest.mark.parametrize("sized", [True, False])
def test_a_loader_that_refills_one_buffer_trains_on_each_batch_it_yielded(sink_size, sized):
    from lightms.callbacks import Callback
    from conftest import parameters_of, reference_sgd

    x, y = make_data(80)
    batches = batches_of(x, y, 8)  # 10 batches: windows of 3 span chunks of 4, the last window has 1

    class SeenByHooks(Callback):
        def __init__(self):
            self.sums = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            chunk = batch if sink_size > 1 else [batch]
            self.sums += [float(bx.asnumpy().sum()) for bx, _ in chunk]

    reference = fresh_model()
    reference_sgd(reference, [batches[0:3], batches[3:6], batches[6:9], batches[9:]], lr=0.1)
    seen = SeenByHooks()
    for callbacks in ([seen], []):  # the hook reads every batch back (a host sync); without it, nothing does
        model = fresh_model()
        quiet_trainer(max_epochs=1, sink_size=sink_size, accumulate=3, callbacks=callbacks).fit(
            model, RefillingLoader(batches, sized))
        for name, value in parameters_of(reference).items():
            np.testing.assert_allclose(parameters_of(model)[name], value, atol=1e-6)
    np.testing.assert_allclose(seen.sums, [bx.sum() for bx, _ in batches], rtol=1e-6)


def test_data_shorter_than_its_length_is_named():
    x, y = make_data(32)
    batches = batches_of(x, y, 8)

    class Short:
        def __iter__(self):
            return iter(batches[:3])

        def __len__(self):
            return 4

    with pytest.raises(ValueError, match=r"train_dataloaders ended after 3 batches, but its len\(\) says 4") as error:
        quiet_trainer(max_epochs=1).fit(fresh_model(), Short())
    _no_cpp_trace(error)


def test_every_form_of_a_later_batch_converts_to_its_values():
    import pickle

    x, y = make_data(32)
    strided = (np.ascontiguousarray(x[:16])[::2], y[:8])  # not C-contiguous: converted with a copy
    unpickled = pickle.loads(pickle.dumps((x[8:16], y[8:16])))  # equal dtypes, not the same objects
    as_tensors = (Tensor(x[16:24]), y[16:24])  # a Tensor where the first batch had an array
    batches = [(x[:8], y[:8]), strided, unpickled, as_tensors, (x[24:], y[24:])]
    got = list(DataSource(batches, "train_dataloaders").batches())
    for batch, (bx, by) in zip(got, batches):
        assert type(batch.data) is tuple and batch.shapes == (tuple(bx.shape), by.shape)
        np.testing.assert_array_equal(batch.data[0].asnumpy(), bx.asnumpy() if isinstance(bx, Tensor) else bx)
        np.testing.assert_array_equal(batch.data[1].asnumpy(), by)
    batches[-1][0][0, 0] = 123.0  # a C-contiguous batch is shared, not copied
    assert got[-1].data[0].asnumpy()[0, 0] == 123.0
    assert [b.is_last for b in got] == [False] * 4 + [True]


def test_a_fast_path_batch_makes_its_tensors_once_when_read_and_keeps_its_structure(monkeypatch):
    # The usual (x, y) batch's Tensors are made on first read (a sunk chunk never reads them),
    # share the arrays' memory, and rebuild the batch's container around other leaves.
    made = []
    from_numpy = Tensor.from_numpy
    monkeypatch.setattr(Tensor, "from_numpy", staticmethod(lambda array: made.append(1) or from_numpy(array)))
    x, y = make_data(24)
    for container in (tuple, list):
        batches = [container((x[i:i + 8], y[i:i + 8])) for i in (0, 8, 16)]
        later = list(DataSource(batches, "train_dataloaders").batches())[1]
        assert later.structured(["a", "b"]) == container(["a", "b"])
        made.clear()
        data = later.data
        assert len(made) == 2  # made now, when read
        assert type(data) is container and later.data is data
        batches[1][0][0, 0] = -7.0  # shared, not copied
        assert data[0].asnumpy()[0, 0] == -7.0
        np.testing.assert_array_equal(data[1].asnumpy(), y[8:16])
    as_dicts = [{"x": x[i:i + 8], "y": y[i:i + 8]} for i in (0, 8)]
    later = list(DataSource(as_dicts, "train_dataloaders").batches())[1]
    assert later.structured([1, 2]) == {"x": 1, "y": 2}
    single = list(DataSource([x[:8], x[8:16]], "train_dataloaders").batches())[1]
    assert single.structured(["only"]) == "only"


def test_strings_and_bytes_are_refused_at_the_data_boundary_naming_the_batch_and_leaf():
    x, y = make_data(16)
    names = np.array(["a"] * 8)
    with pytest.raises(TypeError, match=r"train_dataloaders, batch 0, leaf \[1\]: a numpy array of dtype <U1"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), [(x[:8], names)])
    later = batches_of(x, y, 8) + [(x[:8], np.array([b"label"] * 8))]
    with pytest.raises(TypeError, match=r"batch 2, leaf \[1\]: a numpy array of dtype \|S5"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), later)
    keyed = [{"x": x[:8], "y": y[:8], "id": np.array([object()] * 8)}]
    with pytest.raises(TypeError, match=r"batch 0, leaf \['id'\]: a numpy array of dtype object"):
        quiet_trainer(max_epochs=1).fit(fresh_model(), keyed)
