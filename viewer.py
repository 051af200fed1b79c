"""A minimal OpenCV window for watching an agent: `ImageViewer().show(obs)`."""
import os
import sys

import cv2
import numpy as np


class ImageViewer:
    """Shows uint8 RGB frames, enlarged `scale` times, in one window."""

    def __init__(self, title="PlaNet", scale=6):
        self.title, self.scale = title, scale
        # Without a display, OpenCV's Qt backend aborts the whole process: refuse first.
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise RuntimeError("--render needs a display (DISPLAY is not set); on a headless machine "
                               "use video_prediction.py, or run under xvfb-run")
        try:
            cv2.namedWindow(self.title, cv2.WINDOW_AUTOSIZE)
        except cv2.error as error:
            raise RuntimeError("cannot open a window: --render needs the GUI build of OpenCV "
                               "(pip install opencv-python)") from error

    def show(self, obs):
        """One frame `(3, H, W)`, or N frames `(N, 3, H, W)` side by side."""
        if obs.ndim == 4:
            obs = np.concatenate(list(obs), axis=2)
        image = cv2.cvtColor(np.ascontiguousarray(obs.transpose(1, 2, 0)), cv2.COLOR_RGB2BGR)
        image = cv2.resize(image, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_NEAREST)
        cv2.imshow(self.title, image)
        cv2.waitKey(1)

    def close(self):
        cv2.destroyWindow(self.title)
