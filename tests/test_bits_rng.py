"""Shared op infrastructure: exact bit packing and the counter-hash RNG."""
import pytest
import torch

from tempo_ds.ops._bits import pack_bits, packed_nbytes, unpack_bits
from tempo_ds.ops._library import draw_seed as device_seed
from tempo_ds.ops._rng import draw_seed, drop_threshold, keep_mask, mix32, uniform_u32, uniform_u32_range


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_round_trip_takes_exactly_ceil_n_b_over_8_bytes(bits, n):
    codes = torch.randint(0, 2**bits, (n,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


def test_pack_layout_is_little_endian_groups_of_eight():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert pack_bits(torch.tensor([3, 1]), 2).tolist() == [0b0111]


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bit_width_is_refused(bits):
    with pytest.raises(ValueError, match="allowed values: 1..8"):
        pack_bits(torch.zeros(3, dtype=torch.long), bits)


def test_mix32_matches_a_plain_python_uint32_reference():
    def ref(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x5BD1E995) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 12345, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]


def test_keep_mask_is_a_pure_function_of_seed_and_index():
    whole = keep_mask(7, 0.25, 0, 10_000, "cpu")
    assert torch.equal(whole[3000:7000], keep_mask(7, 0.25, 3000, 4000, "cpu"))
    assert not torch.equal(whole, keep_mask(8, 0.25, 0, 10_000, "cpu"))
    # keep fraction within 5 binomial standard deviations of 0.75
    assert abs(whole.float().mean().item() - 0.75) < 5 * (0.75 * 0.25 / 10_000) ** 0.5
    high = uniform_u32(7, torch.tensor([2**33 + 5]))
    assert 0 <= high.item() < 2**32


def test_thresholds_and_seed_source():
    assert drop_threshold(0.0) == 0 and drop_threshold(1.0) == 2**32
    assert not keep_mask(1, 1.0, 0, 100, "cpu").any() and keep_mask(1, 0.0, 0, 100, "cpu").all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_threshold(1.5)
    torch.manual_seed(3)
    a = draw_seed()
    torch.manual_seed(3)
    assert draw_seed() == a   # drawn from the default generator, so checkpoints replay it
    torch.manual_seed(3)
    seed = device_seed(torch.device("cpu"))   # what the ops draw: the same value, as a 1-element int64 tensor
    assert seed.dtype == torch.int64 and seed.shape == (1,) and int(seed) == a


def test_a_device_seed_gives_the_bits_of_the_int_seed():
    """Tensor seeds (never read on the host) and int seeds hash alike, across a 2**32 window of indices too."""
    seed = torch.tensor([12345])
    for start, count in ((0, 70_000), (2**32 - 50, 100), (2**33, 9)):
        index = torch.arange(start, start + count)
        assert torch.equal(uniform_u32_range(seed, start, count, "cpu"), uniform_u32(12345, index))
        assert torch.equal(uniform_u32(seed, index), uniform_u32(12345, index))
        assert torch.equal(keep_mask(seed, 0.3, start, count, "cpu"), keep_mask(12345, 0.3, start, count, "cpu"))


def test_int32_hash_path_equals_the_int64_definition():
    from tempo_ds.ops._rng import C_HI, M32

    def definition(seed, index):
        key = mix32(((index >> 32) * C_HI + seed) & M32)
        return mix32((mix32((index & M32) ^ key) + key) & M32)

    for index in (torch.arange(0, 70_000), torch.arange(2**32 - 50, 2**32 + 50), torch.arange(2**33, 2**33 + 9)):
        assert torch.equal(uniform_u32(12345, index), definition(12345, index))
