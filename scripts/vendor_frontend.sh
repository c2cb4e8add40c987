#!/usr/bin/env bash
# Rebuild difract_ext/graphs/assets/ (the patched copy of circuit-tracer's frontend) from:
#  1. the frontend assets of the installed circuit-tracer (MIT, Anthropic), a subset of files;
#  2. the libraries its pages load from CDNs, fetched with `npm pack` and copied unmodified
#     (dist file + license) under vendor/;
#  3. the difract-ext patch below (local script paths, no remote look-ups, residue node glyph,
#     every shown position labelled, the image panel registered).
# Our own files under assets/difract/ (jetpack-shim.js, difract-image.js, difract.css) and
# VENDORED.md are kept as they are.
#
# Usage: scripts/vendor_frontend.sh [DEST]   (DEST defaults to difract_ext/graphs/assets)
# Needs: npm (registry access), patch, the project venv with circuit-tracer installed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-difract_ext/graphs/assets}"
PY="${PY:-.venv/bin/python}"

D3_VERSION=7.9.0
DAGRE_VERSION=1.1.4        # @dagrejs/dagre: the maintained dagre (stock pages use dagre 0.8.5)
GRAPHLIB_VERSION=2.2.4     # @dagrejs/graphlib: bundled inside dagre.min.js; license kept
PAKO_VERSION=2.1.0

SRC="$("$PY" -c 'import circuit_tracer, pathlib; print(pathlib.Path(circuit_tracer.__file__).parent / "frontend" / "assets")')"
CT_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("circuit-tracer"))')"
echo "circuit-tracer $CT_VERSION assets: $SRC"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# 1. stock assets (the pages index.html uses; not addition/, feature-view.html, prettier config)
mkdir -p "$DEST"
rm -rf "$DEST/attribution_graph" "$DEST/feature_examples" "$DEST/vendor"
(cd "$SRC" && cp --parents LICENSE README.md index.html style.css util.js \
    attribution_graph/*.js attribution_graph/cg.css attribution_graph/gridsnap/* \
    feature_examples/* "$OLDPWD/$DEST/")

# 2. vendored libraries
(cd "$TMP" && npm pack --silent "d3@$D3_VERSION" "@dagrejs/dagre@$DAGRE_VERSION" \
    "@dagrejs/graphlib@$GRAPHLIB_VERSION" "pako@$PAKO_VERSION" >/dev/null)
unpack() { mkdir -p "$TMP/$2" && tar xzf "$TMP/$1" -C "$TMP/$2"; }
unpack "d3-$D3_VERSION.tgz" d3
unpack "dagrejs-dagre-$DAGRE_VERSION.tgz" dagre
unpack "dagrejs-graphlib-$GRAPHLIB_VERSION.tgz" graphlib
unpack "pako-$PAKO_VERSION.tgz" pako
mkdir -p "$DEST/vendor/d3" "$DEST/vendor/dagre" "$DEST/vendor/pako"
cp "$TMP/d3/package/dist/d3.min.js" "$TMP/d3/package/LICENSE" "$DEST/vendor/d3/"
cp "$TMP/dagre/package/dist/dagre.min.js" "$TMP/dagre/package/LICENSE" "$DEST/vendor/dagre/"
cp "$TMP/graphlib/package/LICENSE" "$DEST/vendor/dagre/LICENSE.graphlib"
cp "$TMP/pako/package/dist/pako_inflate.min.js" "$TMP/pako/package/LICENSE" "$DEST/vendor/pako/"

# 3. the difract-ext patch to the stock files
(cd "$DEST" && patch -p1 --quiet --no-backup-if-mismatch <<'PATCH_END'
diff -ruN a/attribution_graph/init-cg-feature-detail.js b/attribution_graph/init-cg-feature-detail.js
--- a/attribution_graph/init-cg-feature-detail.js
+++ b/attribution_graph/init-cg-feature-detail.js
@@ -43,7 +43,7 @@
       visState.isHideLayer ? `#F${d.featureIndex}` : 
       `${utilCg.layerLocationLabel(d.layer, d.probe_location_idx)}/${featIdx}`
 
-    if (d.isError || d.feature_type == 'embedding' || d.feature_type == 'logit'){
+    if (d.isError || d.feature_type == 'embedding' || d.feature_type == 'logit' || d.feature_type == 'unexplored feature residue'){  // difract-ext: residue
       if (d.isError) addLogits(d)
       if (d.feature_type=='logit') addEmbeddings(d)
 
diff -ruN a/attribution_graph/init-cg-link-graph.js b/attribution_graph/init-cg-link-graph.js
--- a/attribution_graph/init-cg-link-graph.js
+++ b/attribution_graph/init-cg-link-graph.js
@@ -259,7 +259,7 @@
   var promptTicks = data.metadata.prompt_tokens.slice(earliestCtxWithNodes).map((token, i) =>{
     var ctx_idx = i + earliestCtxWithNodes 
     var mNodes = nodes.filter(d => d.ctx_idx == ctx_idx)
-    var hasEmbed = mNodes.some(d => d.feature_type == 'embedding')
+    var hasEmbed = mNodes.length > 0  // difract-ext: label every shown position (text token or image patch)
     return {token, ctx_idx, mNodes, hasEmbed}
   })
 
diff -ruN a/attribution_graph/init-cg.js b/attribution_graph/init-cg.js
--- a/attribution_graph/init-cg.js
+++ b/attribution_graph/init-cg.js
@@ -179,6 +179,7 @@
       {cur: {x: 8, y: 1, w: 6, h: 6}, class: 'node-connections'},
       {cur: {x: 8, y: 6, w: 6, h: 10}, class: 'feature-detail'},
       {cur: {x: 0, y: 0, w: 8, h: 8}, class: 'link-graph', resizeFn: makeResizeFn(initCgLinkGraph)},
+      window.initDifractImage && {cur: {x: 14, y: 0, w: 6, h: 12}, class: 'difract-image'},  // difract-ext
       // {cur: {x: 0, y: 18, w: 6, h: 7}, class: 'clerp-list'},
       // {cur: {x: 6, y: 30, w: 4, h: 7}, class: 'feature-scatter'},
       // {cur: {x: 0, y: 30, w: 3, h: 8}, class: 'metadata'},
@@ -190,6 +191,7 @@
       initCgLinkGraph,
       initCgNodeConnections, 
       initCgFeatureDetail, 
+      window.initDifractImage,  // difract-ext: generated image + patch heatmap
       // initCgClerpList, 
       // initCgFeatureScatter, 
     ].filter(d => d)
diff -ruN a/attribution_graph/util-cg.js b/attribution_graph/util-cg.js
--- a/attribution_graph/util-cg.js
+++ b/attribution_graph/util-cg.js
@@ -645,6 +645,7 @@
     if (type == 'logit') return '■'
     if (type == 'embedding') return '■'
     if (type === 'mlp reconstruction error') return '◆'
+    if (type === 'unexplored feature residue') return '▲'  // difract-ext
     return '●'
     
   }
diff -ruN a/feature_examples/init-feature-examples.js b/feature_examples/init-feature-examples.js
--- a/feature_examples/init-feature-examples.js
+++ b/feature_examples/init-feature-examples.js
@@ -83,13 +83,18 @@
 
 
   async function loadFeature(scan, featureIndex){
+    try {  // difract-ext: a missing feature file shows "failed to load" instead of throwing
     if (scan.startsWith('./')) {
       var feature = await  util.getFile(`${scan}/${featureIndex}.json`)
-    } else if (await indexFileExists(scan)){
+    } else if (!window.isLocalServing && await indexFileExists(scan)){  // difract-ext: local only
       var feature = await loadFeatureFromBinary(scan, featureIndex)
     } else {
       var feature = await  util.getFile(`./features/${scan}/${featureIndex}.json`)
     }
+    } catch (exc) {
+      console.warn(`no feature file for ${scan} ${featureIndex}`, exc)
+      var feature = {isDead: true, examples_quantiles: [], top_logits: [], bottom_logits: []}
+    }
 
     if (feature.act_min === undefined) {
       feature.act_min = 0
diff -ruN a/index.html b/index.html
--- a/index.html
+++ b/index.html
@@ -3,6 +3,7 @@
 <meta name='viewport' content='width=1000, initial-scale=1'>
 <link rel='stylesheet' href='./style.css'>
 <title>Attribution Graphs</title>
+<link rel='icon' href='data:,'>
 
 <div class='tooltip tooltip-hidden'></div>
 <div class='nav'></div>
@@ -12,12 +13,13 @@
 <link rel='stylesheet' href='./attribution_graph/gridsnap/gridsnap.css'>
 <link rel='stylesheet' href='./feature_examples/feature-examples.css'>
 
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/hotserver-client-ws.js'></script>
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js'></script>
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/jetpack_2024-07-20.js'></script>
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/npy_v0.js'></script>
-<script src='https://unpkg.com/dagre@0.8.5/dist/dagre.min.js'></script>
-<script src='https://unpkg.com/pako@2.1.0/dist/pako.min.js'></script>
+<link rel='stylesheet' href='./difract/difract.css'>
+
+<!-- difract-ext: libraries vendored locally (see VENDORED.md); jetpack/npy replaced by a shim -->
+<script src='./vendor/d3/d3.min.js'></script>
+<script src='./difract/jetpack-shim.js'></script>
+<script src='./vendor/dagre/dagre.min.js'></script>
+<script src='./vendor/pako/pako_inflate.min.js'></script>
 
 <script src='./feature_examples/init-feature-examples-list.js'></script>
 <script src='./feature_examples/init-feature-examples-logits.js'></script>
@@ -35,6 +37,7 @@
 <script src='./attribution_graph/init-cg-feature-scatter.js'></script>
 <script src='./attribution_graph/init-cg-subgraph.js'></script>
 <script src='./attribution_graph/init-cg.js'></script>
+<script src='./difract/difract-image.js'></script>
 
 <script>
 window.init = async function(){
diff -ruN a/util.js b/util.js
--- a/util.js
+++ b/util.js
@@ -42,7 +42,8 @@
     // Cache storage 
     var __datacache = window.__datacache = window.__datacache || {}
 
-    if (path.startsWith('./features/')) {
+    // difract-ext: never rewrite to a remote host when served locally
+    if (!window.isLocalServing && path.startsWith('./features/')) {
       path = path.replace('./features/', 'https://d1fk9w8oratjix.cloudfront.net/features/')
     }
 
PATCH_END
)

for f in difract/jetpack-shim.js difract/difract-image.js difract/difract.css VENDORED.md; do
  [ -f "$DEST/$f" ] || echo "warning: $DEST/$f is missing (difract-ext's own file, not generated)" >&2
done
if grep -rn "https\?://[a-z]" "$DEST" --include=*.html | grep -i "<script\|<link"; then
  echo "error: a page still loads something remote" >&2
  exit 1
fi
echo "vendored frontend written to $DEST"
