"""The ``mni152-sim`` embedded dataset: paired multi-contrast brain "subjects" simulated from real anatomy.

Anatomy comes from nilearn's shipped MNI ICBM152 2009 grey/white-matter probability maps and brain mask
(no download). Each subject gets a random smooth deformation and small affine, an optional BraTS-like
lesion, a synthetic skull and scalp, then contrasts are simulated the way the BrainWeb simulator does
(tissue parameters through signal equations; Kwan, Evans & Pike, IEEE TMI 18:1085, 1999):

* T1, T2 (spin echo ``S = PD (1 - e^-TR/T1) e^-TE/T2``), FLAIR (inversion recovery, TI nulling CSF), T1CE
  (T1 shortened by gadolinium, ``1/T1' = 1/T1 + r1 C``), with a bias field and Rician noise each; MR images
  are skull-stripped like BraTS.
* CT in Hounsfield units with skull and scalp; CBCT from the CT with more noise, cupping, scatter-like
  shading, streaks and a global HU offset; FDG PET in SUV from tissue uptake, blurred to PET resolution with
  Poisson-like noise.

All images of a subject share one grid (``affine``), so every slice is a perfectly paired sample.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import ndimage

# Relaxation at 1.5 T (ms) and proton density, inside the ranges of docs/simulation.md and of published 1.5 T
# values (Stanisz et al., MRM 54:507, 2005, WM T1 884 / T2 72, GM T1 1124 / T2 95; BrainWeb's tissue table,
# Kwan et al. 1999). WM T1 is taken at the low end so T1-weighted WM/GM contrast is as on real scans.
# Lesion compartments: vasogenic oedema has prolonged T1/T2, necrosis is fluid-like (e.g. Just & Thelen,
# Radiology 169:779, 1988, tumour/oedema relaxation times).
TISSUE_MR = {  # name: (T1, T2, PD)
    "wm": (700.0, 75.0, 0.70),
    "gm": (1100.0, 90.0, 0.80),
    "csf": (3500.0, 1500.0, 1.00),
    "oedema": (1300.0, 180.0, 0.86),
    "necrosis": (2500.0, 600.0, 0.95),
    "enhancing": (1100.0, 110.0, 0.85),
}
# Gadolinium: r1 ≈ 4.1 L/(mmol s) at 1.5 T for gadopentetate/gadobutrol (Rohrer et al., Invest Radiol
# 40:715, 2005). Tissue concentration (mM): normal tissue only through its blood volume (CBV ≈ 5 % GM,
# 2.5 % WM, blood ≈ 1 mM after a 0.1 mmol/kg dose); the leaky rim of a high-grade tumour ≈ 0.6 mM.
GD_R1_PER_MM_S = 4.1
GD_CONC_MM = {"gm": 0.05, "wm": 0.025, "enhancing": 0.6, "oedema": 0.02}
# Sequences (ms), docs/simulation.md: T1w spin echo, T2w spin echo, FLAIR inversion recovery.
T1W = (500.0, 15.0)
T2W = (4000.0, 100.0)
FLAIR = (9000.0, 100.0)
# Hounsfield units (docs/simulation.md; brain values as in standard CT texts, e.g. WM 20-30, GM 35-45, CSF 0-15,
# fat about -100, cortical bone 1000-2000, diploe a few hundred).
TISSUE_HU = {"wm": 28.0, "gm": 40.0, "csf": 8.0, "oedema": 18.0, "necrosis": 15.0, "enhancing": 36.0,
             "gap": 8.0, "diploe": 600.0, "scalp": 40.0, "fat": -90.0, "air": -1000.0}
CORTICAL_BONE_HU = (1300.0, 1800.0)
# FDG SUV: cortex about 2.5-3x white matter (docs/simulation.md; e.g. EANM brain FDG guideline, Varrone et al.,
# EJNMMI 36:2103, 2009), CSF near zero, high-grade tumour rim at or above cortex, necrosis photopenic.
TISSUE_SUV = {"wm": 3.0, "gm": 8.0, "csf": 0.3, "oedema": 2.2, "necrosis": 0.8, "enhancing": 10.0,
              "gap": 0.3, "bone": 0.6, "scalp": 1.2, "fat": 0.4}
PET_FWHM_MM = 6.0  # clinical brain PET resolution (several mm FWHM)
SIM_MODALITIES = ("t1", "t1ce", "t2", "flair", "ct", "cbct", "pet")


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    voxel_mm: float = 2.0  # output grid; 1 and 2 use nilearn's maps directly, others resample
    lesion_probability: float = 0.8
    deformation_mm: float = 3.0  # peak smooth displacement
    margin_mm: float = 22.0  # room around the brain box for the skull and scalp


@dataclasses.dataclass
class Subject:
    images: dict[str, np.ndarray]  # modality -> float32 [X, Y, Z] in native units (HU, SUV, MR a.u.)
    affine: np.ndarray
    head_mask: np.ndarray  # bool [X, Y, Z]
    brain_mask: np.ndarray
    lesion: dict


@functools.lru_cache(maxsize=4)
def _template(voxel_mm: float, margin_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, CSF fractions (float32 [X, Y, Z], padded by the margin) and the affine."""
    from nilearn import datasets  # optional heavy dependency: only the simulation needs nilearn

    resolution = 1 if voxel_mm < 2 else 2
    gm_img = datasets.load_mni152_gm_template(resolution=resolution)
    gm = np.asarray(gm_img.get_fdata(), np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).get_fdata(), np.float32) > 0.5
    affine = np.asarray(gm_img.affine, np.float64).copy()
    base = float(resolution)
    if abs(voxel_mm - base) > 1e-6:
        # grid_mode=True maps voxel edges onto voxel edges, so the affine below is exact.
        factor = base / voxel_mm
        n_in = np.array(gm.shape, float)
        gm, wm = (ndimage.zoom(a, factor, order=1, grid_mode=True, mode="grid-constant") for a in (gm, wm))
        mask = ndimage.zoom(mask.astype(np.float32), factor, order=1, grid_mode=True,
                            mode="grid-constant") > 0.5
        ratio = n_in / np.array(gm.shape, float)
        affine[:3, :3] = affine[:3, :3] * ratio
        affine[:3, 3] += affine[:3, :3] @ (0.5 - 0.5 / ratio)
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(1.0 - gm - wm, 0, 1) * mask  # inside the brain mask, the rest is CSF (ventricles, sulci)
    pad = int(round(margin_mm / abs(affine[0, 0])))
    gm, wm, csf = (np.pad(a, pad) for a in (gm, wm, csf))
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad, float)
    return gm.astype(np.float32), wm.astype(np.float32), csf.astype(np.float32), affine


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _soft_below(d: np.ndarray, threshold: float, width: float = 0.08) -> np.ndarray:
    return np.clip((threshold - d) / width + 0.5, 0.0, 1.0)


def _warp(rng: np.random.Generator, maps: list[np.ndarray], voxel_mm: float, config: PhantomConfig):
    shape = maps[0].shape
    centre = (np.array(shape, float) - 1) / 2
    angles = np.deg2rad(rng.uniform(-4, 4, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    matrix = rot @ np.diag(rng.uniform(0.93, 1.07, size=3))
    shift = rng.uniform(-2, 2, size=3) / voxel_mm
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
    coords = (matrix.astype(np.float32) @ grid) + (centre + shift)[:, None].astype(np.float32)
    amp = config.deformation_mm / voxel_mm / 3.0  # unit-std fields peak near 3 std
    sigma = max(1.0, 12.0 / voxel_mm)
    for axis in range(3):
        coords[axis] += amp * _smooth_noise(rng, shape, sigma).ravel()
    return [ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0).reshape(shape)
            for m in maps]


def _lesion(rng: np.random.Generator, fr: dict[str, np.ndarray], affine: np.ndarray, voxel_mm: float) -> dict:
    """Replaces normal tissue by necrosis / enhancing rim / oedema fractions in ``fr`` (in place)."""
    candidates = np.flatnonzero(fr["wm"].ravel() > 0.6)
    if candidates.size == 0:
        return {"present": False}
    centre = np.array(np.unravel_index(rng.choice(candidates), fr["wm"].shape), float)
    radius_mm = rng.uniform(8.0, 18.0) * rng.uniform(0.8, 1.2, size=3)
    grid = np.indices(fr["wm"].shape, dtype=np.float32)
    d = np.sqrt(sum(((grid[i] - centre[i]) * voxel_mm / radius_mm[i]) ** 2 for i in range(3)))
    d = d * (1.0 + 0.2 * _smooth_noise(rng, d.shape, max(1.0, 4.0 / voxel_mm)))  # irregular border
    brain = fr["gm"] + fr["wm"] + fr["csf"]
    core = _soft_below(d, 0.7) * np.clip(brain, 0, 1)
    necrosis = core * _soft_below(d, 0.45)
    oedema_weight = _soft_below(d, 1.5, 0.3) * (1 - _soft_below(d, 0.7))
    for name in ("gm", "wm", "csf"):
        fr[name] = fr[name] * (1 - core)
    # Oedema spreads mostly along white matter.
    take_wm = oedema_weight * 0.9
    take_gm = oedema_weight * 0.4
    fr["oedema"] = fr["wm"] * take_wm + fr["gm"] * take_gm
    fr["wm"] = fr["wm"] * (1 - take_wm)
    fr["gm"] = fr["gm"] * (1 - take_gm)
    fr["necrosis"] = necrosis
    fr["enhancing"] = core - necrosis
    centre_mm = (affine[:3, :3] @ centre + affine[:3, 3]).tolist()
    return {"present": True, "centre_mm": centre_mm, "radius_mm": radius_mm.tolist()}


def _spin_echo(t1, t2, pd, tr, te):
    return pd * (1 - math.exp(-tr / t1)) * math.exp(-te / t2)


def _flair(t1, t2, pd, tr, te, ti):
    return pd * abs(1 - 2 * math.exp(-ti / t1) + math.exp(-tr / t1)) * math.exp(-te / t2)


def mr_signals(params: dict[str, tuple[float, float, float]], contrast: bool = False) -> dict[str, dict]:
    """Per-tissue signal of each MR sequence (no noise or bias); ``contrast`` applies gadolinium to T1."""
    out = {"t1": {}, "t1ce": {}, "t2": {}, "flair": {}}
    t1_csf = params["csf"][0]
    tr_f, te_f = FLAIR
    ti = t1_csf * math.log(2 / (1 + math.exp(-tr_f / t1_csf)))  # exact CSF null for this TR
    for name, (t1, t2, pd) in params.items():
        t1_gd = 1000.0 / (1000.0 / t1 + GD_R1_PER_MM_S * GD_CONC_MM.get(name, 0.0))
        out["t1"][name] = _spin_echo(t1, t2, pd, *T1W)
        out["t1ce"][name] = _spin_echo(t1_gd, t2, pd, *T1W)
        out["t2"][name] = _spin_echo(t1, t2, pd, *T2W)
        out["flair"][name] = _flair(t1, t2, pd, tr_f, te_f, ti)
    return out


def simulate_subject(index: int, seed: int = 0, config: PhantomConfig = PhantomConfig()) -> Subject:
    """Subject ``index`` of the population drawn with ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index, 152])
    gm0, wm0, csf0, affine = _template(float(config.voxel_mm), float(config.margin_mm))
    voxel_mm = float(abs(affine[0, 0]))
    gm, wm, csf = _warp(rng, [gm0, wm0, csf0], voxel_mm, config)
    fr = {"gm": gm, "wm": wm, "csf": csf}
    zeros = np.zeros_like(gm)
    lesion = {"present": False}
    if rng.random() < config.lesion_probability:
        lesion = _lesion(rng, fr, affine, voxel_mm)
    for name in ("oedema", "necrosis", "enhancing"):
        fr.setdefault(name, zeros)
    brain_frac = sum(fr.values())
    brain = brain_frac > 0.5
    shape = gm.shape

    # Skull and scalp: shells at random, smoothly varying thickness outside the brain.
    dist = ndimage.distance_transform_edt(~brain, sampling=voxel_mm).astype(np.float32)
    sigma = max(1.0, 15.0 / voxel_mm)
    gap = 2.0 + 0.5 * _smooth_noise(rng, shape, sigma)
    skull = rng.uniform(5.5, 8.0) + 1.2 * _smooth_noise(rng, shape, sigma)
    scalp = rng.uniform(4.0, 6.5) + 1.0 * _smooth_noise(rng, shape, sigma)
    outside = ~brain
    in_gap = outside & (dist <= gap)
    in_skull = outside & (dist > gap) & (dist <= gap + skull)
    depth = (dist - gap) / np.maximum(skull, 1.0)  # 0 inner table .. 1 outer table
    cortical = in_skull & ((depth < 0.25) | (depth > 0.75))
    diploe = in_skull & ~cortical
    in_scalp = outside & (dist > gap + skull) & (dist <= gap + skull + scalp)
    fat = in_scalp & ((dist - gap - skull) / np.maximum(scalp, 1.0) > 0.35) & (
        (dist - gap - skull) / np.maximum(scalp, 1.0) < 0.75)
    head = brain | in_gap | in_skull | in_scalp
    images = {}

    # MR: per-subject jitter of the tissue parameters (±5 %) then the signal equations.
    params = {k: tuple(v * rng.uniform(0.95, 1.05) for v in vals) for k, vals in TISSUE_MR.items()}
    signals = mr_signals(params)
    for modality in ("t1", "t1ce", "t2", "flair"):
        clean = sum(fr[t] * signals[modality][t] for t in fr)
        bias = np.exp(rng.uniform(0.1, 0.2) * _smooth_noise(rng, shape, max(1.0, 40.0 / voxel_mm)))
        s = clean * bias
        noise_sigma = rng.uniform(0.01, 0.025) * float(np.percentile(clean[brain], 99))
        n1 = rng.normal(0, noise_sigma, shape).astype(np.float32)
        n2 = rng.normal(0, noise_sigma, shape).astype(np.float32)
        rician = np.sqrt((s + n1) ** 2 + n2**2)
        images[modality] = (1000.0 * rician * brain).astype(np.float32)  # skull-stripped, as BraTS

    # CT in HU.
    hu = dict(TISSUE_HU)
    ct = sum(fr[t] * hu[t] for t in fr) + (1 - brain_frac) * hu["air"]
    ct = np.where(in_gap, hu["gap"], ct)
    ct = np.where(diploe, hu["diploe"] * rng.uniform(0.85, 1.15), ct)
    ct = np.where(cortical, rng.uniform(*CORTICAL_BONE_HU), ct)
    ct = np.where(in_scalp, np.where(fat, hu["fat"], hu["scalp"]), ct)
    ct = np.where(head, ct, hu["air"]).astype(np.float32)
    ct = ndimage.gaussian_filter(ct, 0.6)  # scanner point spread
    ct_noise = np.where(head, 5.0, 10.0).astype(np.float32)
    images["ct"] = (ct + ct_noise * rng.standard_normal(shape).astype(np.float32)).astype(np.float32)

    # CBCT: same anatomy, blurrier and noisier, cupping, low-frequency scatter shading, streaks, HU offset.
    cb = ndimage.gaussian_filter(ct, 1.0)
    xs, ys = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    shading = np.zeros(shape, np.float32)
    amp_cup = rng.uniform(30, 80)
    for z in range(shape[2]):
        m = head[:, :, z]
        if not m.any():
            continue
        cxz, cyz = xs[m].mean(), ys[m].mean()
        radius = max(1.0, float(np.sqrt(m.sum() / np.pi)))
        r2 = ((xs - cxz) ** 2 + (ys - cyz) ** 2) / radius**2
        cup = -amp_cup * np.clip(1 - r2, 0, 1)  # centre darker than the periphery
        streak = np.zeros_like(cup)
        for _ in range(rng.integers(2, 6)):
            theta = rng.uniform(0, np.pi)
            px, py = cxz + rng.normal(0, radius / 4), cyz + rng.normal(0, radius / 4)
            dline = np.abs((xs - px) * np.sin(theta) - (ys - py) * np.cos(theta))
            streak += rng.uniform(-60, 60) * np.exp(-(dline**2) / (2 * 0.7**2))
        shading[:, :, z] = (cup + streak) * m
    scatter = rng.uniform(15, 35) * _smooth_noise(rng, shape, max(1.0, 30.0 / voxel_mm))
    offset = rng.uniform(-30, 30)
    cb = cb + np.where(head, shading + scatter + offset, 0.0)
    cb_noise = np.where(head, rng.uniform(15, 30), 30.0).astype(np.float32)
    images["cbct"] = (cb + cb_noise * rng.standard_normal(shape).astype(np.float32)).astype(np.float32)

    # FDG PET in SUV: uptake, PET resolution blur, Poisson-like counting noise.
    suv = dict(TISSUE_SUV)
    pet = sum(fr[t] * suv[t] for t in fr)
    pet = np.where(in_gap, suv["gap"], pet)
    pet = np.where(in_skull, suv["bone"], pet)
    pet = np.where(in_scalp, np.where(fat, suv["fat"], suv["scalp"]), pet)
    pet = np.where(head, pet, 0.0).astype(np.float32) * rng.uniform(0.85, 1.15)
    pet = ndimage.gaussian_filter(pet, PET_FWHM_MM / (2 * math.sqrt(2 * math.log(2))) / voxel_mm)
    counts_per_suv = rng.uniform(8.0, 15.0) * (voxel_mm / 2.0) ** 3
    pet = rng.poisson(np.clip(pet, 0, None) * counts_per_suv) / counts_per_suv
    images["pet"] = pet.astype(np.float32)

    return Subject(images={m: images[m] for m in SIM_MODALITIES}, affine=affine, head_mask=head,
                   brain_mask=brain, lesion=lesion)
