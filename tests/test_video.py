"""Frames to videos: the mosaic of parallel episodes and the GIFs."""
import io

import cv2
import numpy as np
from PIL import Image

from video import episode_mosaic, write_gif


def test_mosaic_tiles_episodes_and_holds_the_last_frame_of_one_that_ended():
    rng = np.random.default_rng(0)
    long, short = (rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8) for n in (5, 3))
    frames = list(episode_mosaic([long, short], scale=2, tiles=3))
    assert len(frames) == 5 and all(frame.shape == (128, 384, 3) for frame in frames)
    for t, frame in enumerate(frames):
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)[::2, ::2]  # Back to 64x64 per tile.
        np.testing.assert_array_equal(rgb[:, :64], long[t].transpose(1, 2, 0))
        np.testing.assert_array_equal(rgb[:, 64:128], short[min(t, 2)].transpose(1, 2, 0))
        assert not rgb[:, 128:].any()
        assert (frame[::2, ::2] == frame[1::2, 1::2]).all()  # Each pixel enlarged to 2x2.


def test_gif_keeps_every_frame_in_order():
    frames = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(4)]
    data = io.BytesIO()
    write_gif(data, frames, reduce=1)
    image = Image.open(io.BytesIO(data.getvalue()))
    assert image.n_frames == 4 and image.size == (8, 8)
    for i in range(4):
        image.seek(i)
        assert np.asarray(image.convert("RGB"))[0, 0, 0] == 40 * i
