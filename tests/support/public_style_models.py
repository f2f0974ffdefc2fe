"""Small models written the way widely used public model code writes them (not the way
convfuse's rules expect): a YOLO-style detector and an EDSR/SESR-style super-resolution net.

The detector keeps its layers in an ``nn.Sequential`` that its parent never calls: the parent
loops over the children, routes by the plain attributes ``f`` (which earlier output a layer
reads) and ``i`` (its index) and keeps the outputs listed in ``save``; its head builds grids
from ``x.shape`` (so the whole model does not trace) and has methods of its own. The SR net
normalises its input with an attribute write (``self.mean = self.mean.type_as(x)``) and its
train-form blocks pad explicitly (``F.pad``) before unpadded convs, plus a 1x1 skip.
Everything here is toy-sized so the tests stay fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "autopad",
    "Conv",
    "RepConv",
    "Bottleneck",
    "C2f",
    "fuse_conv_and_bn",
    "Concat",
    "Detect",
    "DetectionModel",
    "RoutingParent",
    "TrainBlock",
    "SRNet",
]


# --------------------------------------------------------------------------- YOLO style
def autopad(k, p=None, d=1):  # kernel, padding, dilation
    """Pad to 'same' shape outputs."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    """Standard convolution with args(ch_in, ch_out, kernel, stride, padding, groups, dilation,
    activation)."""

    default_act = nn.SiLU()  # default activation

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class RepConv(nn.Module):
    """RepVGG-style block: a 3x3 and a 1x1 branch with BN (and a BN identity), summed."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False):
        super().__init__()
        assert k == 3 and p == 1
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()
        self.bn = nn.BatchNorm2d(num_features=c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP bottleneck with 2 convolutions: split, bottlenecks, concatenate."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(
            Bottleneck(self.c, self.c, shortcut, g, k=((3, 3), (3, 3)), e=1.0) for _ in range(n)
        )

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def fuse_conv_and_bn(conv, bn):
    """Fuse Conv2d() and BatchNorm2d() layers."""
    fusedconv = (
        nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
        .requires_grad_(False)
        .to(conv.weight.device)
    )  # fmt: skip
    w_conv = conv.weight.view(conv.out_channels, -1)
    w_bn = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fusedconv.weight.copy_(torch.mm(w_bn, w_conv).view(fusedconv.weight.shape))
    b_conv = torch.zeros(conv.weight.shape[0], device=conv.weight.device) if conv.bias is None else conv.bias
    b_bn = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fusedconv.bias.copy_(torch.mm(w_bn, b_conv.reshape(-1, 1)).reshape(-1) + b_bn)
    return fusedconv


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """Detection head: 1x1 convs per level, grids built from ``x.shape`` (cached per size)."""

    stride = torch.empty(0)  # strides computed during build

    def __init__(self, nc=4, ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(ch)
        self.na = 1
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny, i)
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]
                wh = (wh * 2) ** 2 * self.stride[i]
                y = torch.cat((xy, wh, conf), 4)
                z.append(y.view(bs, self.na * nx * ny, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def _make_grid(self, nx=20, ny=20, i=0):
        d, t = self.m[i].weight.device, self.m[i].weight.dtype
        y, x = torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        return torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2) - 0.5


class DetectionModel(nn.Module):
    """A toy detector built from a layer table (from, module, args), as YOLO builds its own."""

    def __init__(self, ch=3, nc=4, w=4):
        super().__init__()
        table = [
            (-1, Conv, (ch, w, 3, 2)),  # 0 P1/2
            (-1, Conv, (w, 2 * w, 3, 2)),  # 1 P2/4
            (-1, C2f, (2 * w, 2 * w, 1, True)),  # 2
            (-1, Conv, (2 * w, 4 * w, 3, 2)),  # 3 P3/8
            (-1, RepConv, (4 * w, 4 * w, 3, 1, 1, 4 * w, 1, True, True)),  # 4 depthwise 3x3 + 1x1 + BN
            (-1, Conv, (4 * w, 4 * w, 3, 2)),  # 5 P4/16
            (-1, Conv, (4 * w, 4 * w, 3, 2)),  # 6 P5/32
            (-1, nn.Upsample, (None, 2, "nearest")),  # 7
            ([-1, 5], Concat, (1,)),  # 8
            (-1, Conv, (8 * w, 4 * w, 1, 1)),  # 9 P4 out
            (-1, nn.Upsample, (None, 2, "nearest")),  # 10
            ([-1, 4], Concat, (1,)),  # 11
            (-1, Conv, (8 * w, 4 * w, 1, 1)),  # 12 P3 out
            ([12, 9, 6], Detect, (nc, (4 * w, 4 * w, 4 * w))),  # 13
        ]
        layers, save = [], []
        for i, (f, module, args) in enumerate(table):
            m = module(*args)
            m.f, m.i, m.type = f, i, module.__name__
            m.np = sum(x.numel() for x in m.parameters())
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)
        self.names = {i: f"class{i}" for i in range(nc)}
        self.yaml = {"nc": nc, "width": w, "layers": len(table)}
        detect = self.model[-1]
        s = 64
        with torch.no_grad():
            self.stride = torch.tensor([s / x.shape[-2] for x in self.forward(torch.zeros(1, ch, s, s))])
        detect.stride = self.stride

    def forward(self, x):
        y = []  # outputs
        for m in self.model:
            if m.f != -1:  # if not from previous layer
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def fuse(self):
        """Fold Conv-block BatchNorms into their convs, as YOLO's own ``fuse()`` does."""
        for m in self.model.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self

    def is_fused(self, thresh=10):
        bn = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
        return sum(isinstance(v, bn) for v in self.modules()) < thresh

    def info(self):
        return f"{len(self.model)} layers, {sum(p.numel() for p in self.parameters())} parameters"


class RoutingParent(nn.Module):
    """The routing loop of ``DetectionModel`` over any layers: layer ``i`` adds the saved output
    of layer ``f`` to its input (``f = -1``: none); ``channels`` adds a shape check fx cannot
    trace (as a detection head's ``x.shape`` work does), so the children are fused on their own."""

    def __init__(self, layers: list[nn.Module], routes: list[int], channels: int | None = None) -> None:
        super().__init__()
        for i, (m, f) in enumerate(zip(layers, routes)):
            m.f, m.i = f, i
        self.model = nn.Sequential(*layers)
        self.save = sorted({f for f in routes if f >= 0})
        self.channels = channels

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = x + y[m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        if self.channels is not None and x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {x.shape[1]}")
        return x


# --------------------------------------------------------------------------- SR style
class TrainBlock(nn.Module):
    """Train-form block: explicit zero pad, 1x1 expand, unpadded 3x3, 1x1 project, plus a 1x1
    skip on the unpadded input; collapses to one 3x3 for inference."""

    def __init__(self, c, mid, pad_mode="constant"):
        super().__init__()
        self.pad_mode = pad_mode
        self.expand = nn.Conv2d(c, mid, 1)
        self.conv = nn.Conv2d(mid, mid, 3)
        self.project = nn.Conv2d(mid, c, 1)
        self.skip = nn.Conv2d(c, c, 1)
        self.act = nn.PReLU(c)

    def forward(self, x):
        y = F.pad(x, (1, 1, 1, 1), mode=self.pad_mode)
        y = self.project(self.conv(self.expand(y)))
        return self.act(y + self.skip(x))


class SRNet(nn.Module):
    """EDSR-style: mean shift with an attribute write, head conv, blocks, residual, pixel shuffle."""

    def __init__(self, num_in_ch=3, num_feat=8, num_block=3, upscale=2, img_range=255.0, pad_mode="constant"):
        super().__init__()
        self.img_range = img_range
        self.upscale = upscale
        self.mean = torch.Tensor((0.4488, 0.4371, 0.4040)).view(1, 3, 1, 1)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[TrainBlock(num_feat, 2 * num_feat, pad_mode) for _ in range(num_block)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = nn.Sequential(
            nn.Conv2d(num_feat, num_in_ch * upscale**2, 3, 1, 1), nn.PixelShuffle(upscale)
        )

    def forward(self, x):
        self.mean = self.mean.type_as(x)
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        res = self.conv_after_body(self.body(x)) + x
        x = self.upsample(res)
        x = x / self.img_range + self.mean
        return x

    def flops_hint(self, h, w):
        """A custom method public SR code offers (an estimate of the head conv's MACs)."""
        conv = self.conv_first
        return h * w * conv.in_channels * conv.out_channels * math.prod(conv.kernel_size)
