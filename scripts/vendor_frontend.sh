#!/usr/bin/env bash
# Rebuild difract_ext/graphs/assets/ (the patched copy of circuit-tracer's frontend) from:
#  1. the frontend assets of the installed circuit-tracer (MIT, Anthropic), a subset of files;
#  2. the libraries its pages load from CDNs, fetched with `npm pack` and copied unmodified
#     (dist file + license) under vendor/;
#  3. the difract-ext patch below (local script paths, no remote look-ups, residue node glyph,
#     the difract layout, names and panes registered, no console output; see VENDORED.md).
# Our own files under assets/difract/ (jetpack-shim.js, difract-util.js, difract-image.js,
# difract-dashboard.js, difract-feature.js, difract.css) and VENDORED.md are kept as they are.
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
--- a/attribution_graph/init-cg-feature-detail.js	2026-12-03 14:16:58.499422317 +0000
+++ b/attribution_graph/init-cg-feature-detail.js	2026-12-03 14:16:58.785501711 +0000
@@ -43,7 +43,7 @@
       visState.isHideLayer ? `#F${d.featureIndex}` : 
       `${utilCg.layerLocationLabel(d.layer, d.probe_location_idx)}/${featIdx}`
 
-    if (d.isError || d.feature_type == 'embedding' || d.feature_type == 'logit'){
+    if (d.isError || d.feature_type == 'embedding' || d.feature_type == 'logit' || d.feature_type == 'unexplored feature residue'){  // difract-ext: residue
       if (d.isError) addLogits(d)
       if (d.feature_type=='logit') addEmbeddings(d)
 
diff -ruN a/attribution_graph/init-cg-link-graph.js b/attribution_graph/init-cg-link-graph.js
--- a/attribution_graph/init-cg-link-graph.js	2026-12-03 14:16:58.499744778 +0000
+++ b/attribution_graph/init-cg-link-graph.js	2026-12-03 14:16:58.654740152 +0000
@@ -1,9 +1,11 @@
 window.initCgLinkGraph = function({visState, renderAll, data, cgSel}){
   var {nodes, links, metadata} = data
 
+  // difract-ext: nodes laid out by band (layer × stream) and position group, see
+  // difract/difract-util.js; every band labelled; no two nodes share a spot
   var c = d3.conventions({
     sel: cgSel.select('.link-graph').html(''),
-    margin: {left: visState.isHideLayer ? 0 : 30, bottom: 85},
+    margin: {left: 52, bottom: 100, top: 30, right: 40},
     layers: 'sccccs',
   })
   
@@ -16,80 +18,33 @@
   }
   c.svg = c.layers[5]
 
-  // Count max number of nodes at each context to create a polylinear x scale
-  var earliestCtxWithNodes = d3.min(nodes, d => d.ctx_idx)
-  var cumsum = 0
-  var ctxCounts = d3.range(d3.max(nodes, d => d.ctx_idx) + 1).map(ctx_idx => {
-    if (ctx_idx >= earliestCtxWithNodes) {
-      var group = nodes.filter(d => d.ctx_idx === ctx_idx)
-      var maxCount = d3.max([1, d3.max(d3.nestBy(group, d => d.streamIdx), e => e.length)])
-      cumsum += maxCount
-    }
-    return {ctx_idx, maxCount, cumsum}
-  })
-
-  var xDomain = [-1].concat(ctxCounts.map(d => d.ctx_idx))
-  var xRange = [0].concat(ctxCounts.map(d => d.cumsum * c.width / cumsum))
-  c.x = d3.scaleLinear().domain(xDomain.map(d => d + 1)).range(xRange)
-  
-  // TODO: why this was here?
-  // var yNumTicks= visState.isHideLayer ? data.byStream.length : 19 
-  var logitLayer = data.byStream.find(d => d[0].feature_type == 'logit');
-  var yNumTicks = (logitLayer ? parseInt(logitLayer[0].layer) : 26) + 2; // +2 to account for embedding at 0 and layers starting at 1
-
-  c.y = d3.scaleBand(d3.range(yNumTicks), [c.height, 0])
-
-  c.yAxis = d3.axisLeft(c.y)
-    .tickValues(d3.range(yNumTicks))
-    .tickFormat(i => {
-      if (i % 2) return
-      
-      return i == yNumTicks - 1 ? 'Lgt' : i == 0 ? 'Emb' : 'L' + (i - 1) // Subtract 1 from layer numbers
-    })
-  
+  var lay = difract.layout(nodes, metadata, c.width, c.height)
   c.svgBot.append('rect').at({width: c.width, height: c.height, fill: '#F5F4EE'})
-  c.svgBot.append('g').appendMany('rect', [0, yNumTicks - 1])
-    .at({width: c.width, height: c.y.bandwidth(), y: c.y, fill: '#F0EEE7'})
-  
-  c.svgBot.append('g').appendMany('path', d3.range(-1, yNumTicks - 1))
-    .translate(d => [0, c.y(d + 1)])
-    .at({d: `M0,0H${c.width}`, stroke: 'white', strokeWidth: .5})
-  
-  c.drawAxis(c.svgBot)
-  c.svgBot.select('.x').remove()
-  c.svgBot.selectAll('.y line').remove()
-  if (visState.isHideLayer) c.svgBot.select('.y').remove()
-  
-  // Spread nodes across each context 
-  // d.width is the total amount of px space in each column
-  ctxCounts.forEach((d, i) => d.width = c.x(d.ctx_idx + 1) - c.x(ctxCounts[i].ctx_idx))
-  
-  // if default to 8px padding right, if pad right to center singletons 
-  var padR = Math.min(8, d3.min(ctxCounts.slice(1), d => d.width/2)) + 0
-  
-  // find the tightest spacing between nodes and use for all ctx (but don't go below 20)
-  ctxCounts.forEach(d => d.minS = (d.width - padR)/d.maxCount)
-  var overallS = Math.max(20, d3.min(ctxCounts, d => d.minS))
-
-  // apply to nodes
-  d3.nestBy(nodes, d => [d.ctx_idx, d.streamIdx].join('-')).forEach(ctxLayer => {
-    var ctxWidth = c.x(ctxLayer[0].ctx_idx + 1) - c.x(ctxLayer[0].ctx_idx) - padR
-    var s = Math.min(overallS, ctxWidth/ctxLayer.length)
-    
-    // sorting by pinned stacks all the links on top of each other
-    // ctxLayer = d3.sort(ctxLayer, d => visState.pinnedIds.includes(d.nodeId) ? -1 : 1)
-    ctxLayer = d3.sort(ctxLayer, d => -d.logitPct)
-    ctxLayer.forEach((d, i) => {
-      d.xOffset = d.feature_type === 'logit' ? ctxWidth - (padR/2 + i*s) : ctxWidth - (padR/2 + i*s)
-      d.yOffset = 0
-    })
+  c.svgBot.append('g').appendMany('rect.difract-band', lay.bands)
+    .at({y: d => d.y0, width: c.width, height: d => d.height,
+      fill: (d, i) => d.key === 'emb' || d.key === 'targets' ? '#F0EEE7' : i % 2 ? '#F5F4EE' : '#EDEBE3'})
+  c.svgBot.append('g').appendMany('rect.difract-group', lay.groups.filter((g, i) => i % 2))
+    .at({x: d => d.x0, width: d => d.width, height: c.height, fill: 'rgba(255,255,255,.35)'})
+
+  var bandTicks = lay.bands.map(b => ({...b, mid: (b.y0 + b.y1) / 2}))
+  difract.thinLabels(bandTicks.slice().reverse(), d => d.mid, 11)
+  c.svgBot.append('g.axis.difract-bands').appendMany('text.difract-band-label', bandTicks)
+    .at({x: -6, y: d => d.mid, textAnchor: 'end', dominantBaseline: 'middle', fontSize: 10})
+    .st({display: d => d.keep ? null : 'none'})
+    .text(d => d.label)
+  // difract-ext: what the glyphs and colours mean
+  var legendItems = [['●', 'feature'], ['◆', 'error'], ['▲', 'unexplored residue'],
+    ['■', 'input (Emb) / target'], ['', 'edges and fills: green +, purple −, to/from the clicked node']]
+  var legendSel = c.svgBot.append('g.difract-graph-legend').translate([0, -16])
+  var lx = 0
+  legendItems.forEach(([glyph, text]) => {
+    var item = legendSel.append('text').translate([lx, 0]).at({fontSize: 11, fill: '#555'})
+    if (glyph) item.append('tspan').text(glyph + ' ').at({stroke: '#000', strokeWidth: .5, fill: '#fff'})
+    item.append('tspan').text(text)
+    lx += item.node().getComputedTextLength() + 16
   })
-  nodes.forEach(d => d.pos = [
-    c.x(d.ctx_idx) + d.xOffset, 
-    c.y(d.streamIdx) + c.y.bandwidth()/2 + d.yOffset
-  ])
-
-  
+  document.body.dataset.difractFontSize = String(lay.fontSize)
+  document.body.dataset.difractGrouped = lay.grouped ? '1' : ''
   // hover poitns
   var maxHoverDistance = 30
   c.sel
@@ -148,7 +103,7 @@
     .translate(d => d.pos)
     .text(d => utilCg.featureTypeToText(d.feature_type))
     .at({
-      fontSize: 9,
+      fontSize: lay.fontSize,  // difract-ext: sized to the layout's spacing
       fill: d => d.nodeColor,
       stroke: '#000',
       strokeWidth: .5,
@@ -160,7 +115,7 @@
 
   var hoverSel = c.svg.appendMany('circle', nodes)
     .translate(d => d.pos)
-    .at({r: 6, cy: .5, stroke: '#f0f', strokeWidth: 2, strokeDasharray: '2 2', fill: 'none', display: 'xnone', pointEvents: 'none'})
+    .at({r: lay.fontSize * 0.7, cy: .5, stroke: '#f0f', strokeWidth: 2, strokeDasharray: '2 2', fill: 'none', display: 'xnone', pointEvents: 'none'})
 
   links.forEach(d => {
     var [x1, y1] = d.sourceNode.pos
@@ -256,52 +211,36 @@
   }
 
   // Add x axis text/lines
-  var promptTicks = data.metadata.prompt_tokens.slice(earliestCtxWithNodes).map((token, i) =>{
-    var ctx_idx = i + earliestCtxWithNodes 
-    var mNodes = nodes.filter(d => d.ctx_idx == ctx_idx)
-    var hasEmbed = mNodes.some(d => d.feature_type == 'embedding')
-    return {token, ctx_idx, mNodes, hasEmbed}
-  })
-
+  // difract-ext: one label per shown position (or position group when they are too many), every
+  // label kept only where it does not collide with the previous one; the hidden ones stay in the
+  // DOM (display none) and show in the node tooltip
+  var promptTicks = lay.groups.filter(g => g.kind !== 'targets').map(g => ({
+    token: g.label, mid: g.x0 + g.width / 2, x0: g.x0, x1: g.x0 + g.width, group: g,
+  }))
+  difract.thinLabels(promptTicks, d => d.mid, 13)
   var xTickSel = c.svgBot.appendMany('g.prompt-token', promptTicks)
-    .translate(d => [c.x(d.ctx_idx + 1), c.height])
-  
-  xTickSel.append('path').at({d: `M0,0v${-c.height}`, stroke: '#fff',strokeWidth: 1})
-  xTickSel.filter(d => d.hasEmbed).append('path').at({
-    stroke: '#B0AEA6',
-    d: `M-${padR + 3.5},${-c.y.bandwidth()/2 + 6}V${8}`,
-  })
-  
-  xTickSel.filter(d => d.hasEmbed).append('g').translate([-12, 8])
-    .append('text').text(d => d.token) 
+    .translate(d => [d.mid, c.height])
+  xTickSel.append('path').at({d: d => `M${d.x0 - d.mid},2H${d.x1 - d.mid}`, stroke: '#B0AEA6'})
+  xTickSel.append('text').text(d => d.token)
     .at({
-      x: -5,
-      y: 2,
+      x: -6,
+      y: 0,
       textAnchor: 'end',
-      transform: 'rotate(-45)',
+      transform: 'rotate(-90)',
       dominantBaseline: 'middle',
-      fontSize: 12,
-      // fontSize: (d, i) => c.x(i+1) - c.x(i) < 15 ? 9 : 14,
+      fontSize: 10,
     })
-  
+    .st({display: d => d.keep ? null : 'none'})
+    .classed('collided', d => !d.keep)
+  xTickSel.append('title').text(d => d.group.members.length > 1
+    ? d.token + ' (' + d.group.members.length + ' positions)' : d.token)
+
+  // difract-ext: targets labelled by what they are (region × direction) and their value
   var logitTickSel = c.svgBot.append('g.axis').appendMany('g', nodes.filter(d => d.feature_type == 'logit'))
     .translate(d => d.pos)
-  logitTickSel.append('path').at({
-    stroke: '#B0AEA6',
-    d: `M0,${-6}V${-c.y.bandwidth()/2 - 6}`,
-  })
-  logitTickSel.append('g').translate([-5, -c.y.bandwidth()/2 - 8])
-    .append('text').text(d => d.logitToken) 
-    .at({
-      x: 5,
-      y: 2,
-      textAnchor: 'start',
-      transform: 'rotate(-45)',
-      dominantBaseline: 'middle',
-      fontSize: 12,
-      // fontSize: (d, i) => c.x(i+1) - c.x(i) < 15 ? 9 : 14,
-    })
-
+  logitTickSel.append('text.difract-target-label').text(d => d.clerp)
+    .at({x: -lay.fontSize, y: 0, textAnchor: 'end', dominantBaseline: 'middle', fontSize: 12})
+    .st({fill: '#333'})
 
   utilCg.addPinnedClickedGradient(c.svg)
 }
diff -ruN a/attribution_graph/init-cg-node-connections.js b/attribution_graph/init-cg-node-connections.js
--- a/attribution_graph/init-cg-node-connections.js	2026-12-03 14:16:58.499942072 +0000
+++ b/attribution_graph/init-cg-node-connections.js	2026-12-03 14:16:58.738763031 +0000
@@ -55,9 +55,7 @@
   function addHeaderRow(headerSel){
     if (!clickedNode) return 
     
-    headerSel.append('text')
-      .text(clickedNode.feature_type == 'cross layer transcoder' ? 'F#' + d3.format('08')(clickedNode.feature) : ' ')
-      .st({display: 'inline-block', marginRight: 5, 'font-variant-numeric': 'tabular-nums', width: 82})
+    // difract-ext: no second name (F#...); the title is the node's one name
     headerSel.append('span.feature-icon').text(utilCg.featureTypeToText(clickedNode.feature_type))
     headerSel.append('span.feature-title').text(clickedNode.ppClerp)
     
diff -ruN a/attribution_graph/init-cg.js b/attribution_graph/init-cg.js
--- a/attribution_graph/init-cg.js	2026-12-03 14:16:58.500382429 +0000
+++ b/attribution_graph/init-cg.js	2026-12-03 14:16:58.798696536 +0000
@@ -27,8 +27,6 @@
   // Get pinnedIds from URL parameters if available (prioritized over localStorage)
   var urlPinnedIds = util.params.get('pinnedIds');
   var urlHiddenIds = util.params.get('hiddenIds');
-  console.log(urlPinnedIds, urlHiddenIds)
-  console.log(visState.pinnedIds, visState.hiddenIds)
   if (urlPinnedIds) visState.pinnedIds = urlPinnedIds
   if (urlHiddenIds) visState.hiddenIds = urlHiddenIds
 
@@ -39,13 +37,13 @@
       urlSupernodes = JSON.parse(supernodesParam);
     }
   } catch (e) {
-    console.error('Error parsing supernodes from URL:', e);
+    urlSupernodes = [];  // difract-ext: a bad URL parameter is ignored quietly
   }
   if (urlSupernodes) visState.supernodes = urlSupernodes
 
   if (visState.clickedId?.includes('supernode')) delete visState.clickedId
   if (clickedId && clickedId != 'null' && !clickedId.includes('supernode-')) visState.clickedId = clickedId
-  if (!visState.clickedId || visState.clickedId == 'null' || visState.clickedId == 'undefined') visState.clickedId = data.nodes.find(d => d.isLogit)?.nodeId
+  if (!visState.clickedId || visState.clickedId == 'null' || visState.clickedId == 'undefined') visState.clickedId = data.nodes.find(d => d.isLogit || d.feature_type == 'logit')?.node_id  // difract-ext: open on the first target
   if (visState.pinnedIds?.replace) visState.pinnedIds = visState.pinnedIds.split(',')
   if (visState.hiddenIds?.replace) visState.hiddenIds = visState.hiddenIds.split(',')
 
@@ -175,10 +173,13 @@
   function initGridsnap() {
     var gridData = [
       // {cur: {x: 0, y: 0,  w: 6, h: .5}, class: 'button-container'},
-      {cur: {x: 0, y: 8, w: 8, h: 8}, class: 'subgraph'},
-      {cur: {x: 8, y: 1, w: 6, h: 6}, class: 'node-connections'},
-      {cur: {x: 8, y: 6, w: 6, h: 10}, class: 'feature-detail'},
-      {cur: {x: 0, y: 0, w: 8, h: 8}, class: 'link-graph', resizeFn: makeResizeFn(initCgLinkGraph)},
+      // difract-ext: the graph takes two thirds of the window and most of its height; the image
+      // panel and the feature pane (dashboards) share the right third
+      {cur: {x: 0, y: 12, w: 8, h: 4}, class: 'node-connections'},
+      {cur: {x: 8, y: 12, w: 8, h: 4}, class: 'subgraph'},
+      {cur: {x: 16, y: 7, w: 8, h: 9}, class: 'feature-detail'},
+      {cur: {x: 0, y: 0, w: 16, h: 12}, class: 'link-graph', resizeFn: makeResizeFn(initCgLinkGraph)},
+      window.initDifractImage && {cur: {x: 16, y: 0, w: 8, h: 7}, class: 'difract-image'},  // difract-ext
       // {cur: {x: 0, y: 18, w: 6, h: 7}, class: 'clerp-list'},
       // {cur: {x: 6, y: 30, w: 4, h: 7}, class: 'feature-scatter'},
       // {cur: {x: 0, y: 30, w: 3, h: 8}, class: 'metadata'},
@@ -189,7 +190,8 @@
       initCgSubgraph,
       initCgLinkGraph,
       initCgNodeConnections, 
-      initCgFeatureDetail, 
+      window.initDifractFeatureDetail || initCgFeatureDetail,  // difract-ext: dashboards
+      window.initDifractImage,  // difract-ext: generated image + patch heatmap
       // initCgClerpList, 
       // initCgFeatureScatter, 
     ].filter(d => d)
diff -ruN a/attribution_graph/util-cg.js b/attribution_graph/util-cg.js
--- a/attribution_graph/util-cg.js	2026-12-03 14:16:58.500717349 +0000
+++ b/attribution_graph/util-cg.js	2026-12-03 14:16:58.704306121 +0000
@@ -113,7 +113,6 @@
     if (params) {
       const [node, hClerp] = params;
       const scan = data.metadata.scan?.startsWith('custom-') ? data.metadata.transcoder_list[node.layer] : data.metadata.scan;
-      console.log(`Updating clerp for node ${node.featureId} in scan ${scan}:`, hClerp)
       const localClerps = getHClerpsFromLocalStorage(scan);
       localClerps.set(clerpUUID(node), hClerp)
       saveHClerpsToLocalStorage(localClerps, scan);
@@ -132,6 +131,11 @@
       if (!feature) return
       node.localClerp = feature.localClerp
       node.ppClerp = feature.ppClerp
+      // difract-ext: one name per node everywhere (site #index @ position "label")
+      if (window.difract && data.metadata.positions) {
+        node.ppClerp = difract.name(node, data.metadata, node.localClerp)
+        feature.ppClerp = node.ppClerp
+      }
     })
 
     // Save clerps to url param
@@ -253,7 +257,8 @@
       // TODO: switch to featureIndex in graphgen
       d.featureIndex = d.feature
       d.nodeId = d.node_id
-      if (d.feature_type == 'logit' && d.clerp) d.logitPct= +d.clerp.split('(p=')[1].split(')')[0]
+      // difract-ext: targets carry their weight in difract_target, not in a "(p=...)" label
+      if (d.feature_type == 'logit') d.logitPct = d.difract_target ? +d.difract_target.weight : +(d.clerp?.split('(p=')[1]?.split(')')[0] ?? 1)
       idToNode[d.nodeId] = d
       py_node_id_to_node[d.node_id] = d
     })
@@ -271,7 +276,6 @@
         })
       }
     })
-    if (deletedFeatures.length) console.log({deletedFeatures})
     nodes = nodes.filter(d => idToNode[d.nodeId])
     nodes = d3.sort(nodes, d => +d.layer)
 
@@ -458,7 +462,6 @@
   }
 
   function clickFeature(visState, renderAll, d, metaKey){
-    console.log(d)
     if (d.nodeId.includes('supernode-')) return
     
     if (metaKey && visState.isEditMode) {
@@ -645,6 +648,7 @@
     if (type == 'logit') return '■'
     if (type == 'embedding') return '■'
     if (type === 'mlp reconstruction error') return '◆'
+    if (type === 'unexplored feature residue') return '▲'  // difract-ext
     return '●'
     
   }
diff -ruN a/feature_examples/init-feature-examples.js b/feature_examples/init-feature-examples.js
--- a/feature_examples/init-feature-examples.js	2026-12-03 14:16:58.507483500 +0000
+++ b/feature_examples/init-feature-examples.js	2026-12-03 14:16:58.535075724 +0000
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
+      // difract-ext: a missing feature file is shown as such, not logged
+      var feature = {isDead: true, examples_quantiles: [], top_logits: [], bottom_logits: []}
+    }
 
     if (feature.act_min === undefined) {
       feature.act_min = 0
diff -ruN a/index.html b/index.html
--- a/index.html	2026-12-03 14:16:58.498890304 +0000
+++ b/index.html	2026-12-03 14:16:58.618753668 +0000
@@ -3,6 +3,7 @@
 <meta name='viewport' content='width=1000, initial-scale=1'>
 <link rel='stylesheet' href='./style.css'>
 <title>Attribution Graphs</title>
+<link rel='icon' href='data:,'>
 
 <div class='tooltip tooltip-hidden'></div>
 <div class='nav'></div>
@@ -12,12 +13,14 @@
 <link rel='stylesheet' href='./attribution_graph/gridsnap/gridsnap.css'>
 <link rel='stylesheet' href='./feature_examples/feature-examples.css'>
 
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/hotserver-client-ws.js'></script>
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js'></script>
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/jetpack_2024-07-20.js'></script>
-<script src='https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/npy_v0.js'></script>
-<script src='https://unpkg.com/dagre@0.8.5/dist/dagre.min.js'></script>
-<script src='https://unpkg.com/pako@2.1.0/dist/pako.min.js'></script>
+<link rel='stylesheet' href='./difract/difract.css'>
+<script src='./difract/difract-util.js'></script>
+
+<!-- difract-ext: libraries vendored locally (see VENDORED.md); jetpack/npy replaced by a shim -->
+<script src='./vendor/d3/d3.min.js'></script>
+<script src='./difract/jetpack-shim.js'></script>
+<script src='./vendor/dagre/dagre.min.js'></script>
+<script src='./vendor/pako/pako_inflate.min.js'></script>
 
 <script src='./feature_examples/init-feature-examples-list.js'></script>
 <script src='./feature_examples/init-feature-examples-logits.js'></script>
@@ -35,11 +38,31 @@
 <script src='./attribution_graph/init-cg-feature-scatter.js'></script>
 <script src='./attribution_graph/init-cg-subgraph.js'></script>
 <script src='./attribution_graph/init-cg.js'></script>
+<script src='./difract/difract-image.js'></script>
+<script src='./difract/difract-dashboard.js'></script>
+<script src='./difract/difract-feature.js'></script>
 
 <script>
 window.init = async function(){
   window.isLocalServing = true;
-  var {graphs} = await util.getFile('./data/graph-metadata.json', false)
+  // difract-ext: a folder without graphs (or an unreadable index) gets a message, not a blank page
+  var index
+  try {
+    index = await util.getFile('./data/graph-metadata.json', false)
+  } catch (exc) {
+    index = {graphs: [], error: String(exc)}
+  }
+  var graphs = (index && index.graphs) || []
+  if (!graphs.length) {
+    d3.select('.cg').html('').append('div.difract-empty').html(
+      '<h2>No graphs in this folder' + (index.empty_folder ? ' (<code>' + index.empty_folder + '</code>)' : '') + '</h2>' +
+      '<p>' + (index.error ? 'Its graph index could not be read: ' + index.error + '.' :
+        'It has no <code>graph-metadata.json</code> yet.') + '</p>' +
+      '<p>Write a graph into it with <code>difract attribute --prompt "..." --target x0:red@left --out DIR</code> ' +
+      '(or run <code>make demo</code>), then reload this page.</p>')
+    document.body.dataset.difractEmpty = '1'
+    return
+  }
 
   window.visState = window.visState || {
     slug: util.params.get('slug') || graphs[0].slug,
@@ -130,10 +153,7 @@
       
 
       var slug = visState.slug;
-      if (!slug) {
-        console.error("No slug found");
-        return;
-      }
+      if (!slug) return;
 
       var url = `/save_graph/${slug}`;
       
@@ -164,7 +184,6 @@
         // return response.text();
       })
       .then(data => {
-        console.log("Graph saved successfully:", data);
         saveButton.text("Saved!")
           .style("background-color", "#e6f7e6")
           .style("border-color", "#8bc34a");
@@ -179,7 +198,6 @@
         }, 2000);
       })
       .catch(error => {
-        console.error("Error saving graph:", error);
         saveButton.text("Error!")
           .style("background-color", "#ffebee")
           .style("border-color", "#f44336");
diff -ruN a/util.js b/util.js
--- a/util.js	2026-12-03 14:16:58.498960538 +0000
+++ b/util.js	2026-12-03 14:16:58.522314470 +0000
@@ -42,7 +42,8 @@
     // Cache storage 
     var __datacache = window.__datacache = window.__datacache || {}
 
-    if (path.startsWith('./features/')) {
+    // difract-ext: never rewrite to a remote host when served locally
+    if (!window.isLocalServing && path.startsWith('./features/')) {
       path = path.replace('./features/', 'https://d1fk9w8oratjix.cloudfront.net/features/')
     }
 
@@ -68,8 +69,7 @@
 
       if (res.status == 500) {
         var resText = await res.text()
-        console.log(resText, res) 
-        throw '500 error'
+        throw new Error('server error (500) for ' + path + ': ' + resText)  // difract-ext
       }
 
       var type = fileType || path.replaceAll('..', '').split('.').at(-1)
PATCH_END
)

for f in difract/jetpack-shim.js difract/difract-util.js difract/difract-image.js \
    difract/difract-dashboard.js difract/difract-feature.js difract/difract.css VENDORED.md; do
  [ -f "$DEST/$f" ] || echo "warning: $DEST/$f is missing (difract-ext's own file, not generated)" >&2
done
if grep -rn "https\?://[a-z]" "$DEST" --include=*.html | grep -i "<script\|<link"; then
  echo "error: a page still loads something remote" >&2
  exit 1
fi
echo "vendored frontend written to $DEST"
