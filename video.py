"""Frames to files: MP4 videos, and GIFs small enough for a README or TensorBoard's Images tab;
and the plot of predicted against true observation vectors, from states."""
import io
import math

import cv2
import numpy as np
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary


def write_video(path, frames, fps=10):
    """BGR images of one size -> MP4."""
    frames = list(frames)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for frame in frames:
        writer.write(frame)
    writer.release()


def write_gif(path, frames, fps=10, reduce=2):
    """BGR images -> looping animated GIF at 1/`reduce` of their size, small enough for a README.
    `path` may be a file object."""
    # Without dithering: it would make the file several times larger.
    images = [Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)).reduce(reduce)
              .quantize(64, dither=Image.Dither.NONE) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)


def episode_mosaic(observations, scale=2, tiles=None):
    """Episodes played side by side, a list of `(T_i, 3, 64, 64)` RGB uint8 frames -> BGR images of
    them in a row of `tiles` (black where there are fewer episodes), each frame enlarged `scale`
    times; an episode that ended first holds its last frame."""
    blank = np.zeros_like(observations[0][0])
    for t in range(max(len(obs) for obs in observations)):
        frames = [obs[min(t, len(obs) - 1)] for obs in observations]
        row = np.concatenate(frames + [blank] * ((tiles or len(frames)) - len(frames)), axis=2)
        image = cv2.cvtColor(np.ascontiguousarray(row.transpose(1, 2, 0)), cv2.COLOR_RGB2BGR)
        yield cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def add_gif(writer, tag, frames, step, fps=10):
    """BGR images as an animated GIF in TensorBoard's Images tab: what `SummaryWriter.add_video`
    writes, without the moviepy it needs (whose version 2 it cannot use)."""
    frames = list(frames)
    data = io.BytesIO()
    write_gif(data, frames, fps, reduce=1)
    height, width = frames[0].shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data.getvalue())
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def state_plot(truth, prediction, context, labels, columns=4):
    """True against predicted observation vectors over time, `(T, D)` each, one panel per
    dimension named by `labels`, the first `context` steps observed and the rest open loop.
    -> RGB image `(H, W, 3)` uint8, for a PNG or TensorBoard."""
    # Imported here: matplotlib takes half a second to import, and only runs on state observations draw this plot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = math.ceil(len(labels) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.2 * rows), constrained_layout=True)
    canvas = FigureCanvasAgg(figure)  # Draws into memory: no display, no pyplot state to close.
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    steps = np.arange(len(truth))
    for i, axis in enumerate(axes.flat):
        if i >= len(labels):
            axis.axis("off")
            continue
        axis.plot(steps, truth[:, i], color="black", label="truth")
        axis.plot(steps, prediction[:, i], color="tab:red", linestyle="--", label="prediction")
        axis.axvspan(0, context - 1, color="tab:blue", alpha=0.12, label="observed")
        axis.set_title(labels[i], fontsize=9)
        axis.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    figure.supxlabel("step (agent decisions)", fontsize=9)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
