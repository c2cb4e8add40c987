// difract-ext: the feature pane of attribution graphs of FLUX denoising steps (replaces
// circuit-tracer's feature-detail pane, whose token strip assumes a language model).
//
// For the hovered or clicked feature node: its one name, its activation at this node and
//  - its corpus dashboard when `difract serve` knows dashboards for the graph (by
//    metadata.dashboards, metadata.scan or the model; GET dashboards/<scan>/feature/<site>/<i>.json):
//    top examples per step as thumbnails with the patch heat-map, token highlights, the profile
//    over t, its label; a link to the dictionary's static page when there is one;
//  - else this graph's own step (the per-graph feature file features/<scan>/<id>.json): the
//    activation at every patch over this graph's image and at every text token.
// Error, residue, input and target nodes get their name and what they are.
window.initDifractFeatureDetail = function ({visState, renderAll, data, cgSel}) {
  var sel = cgSel.select('.feature-detail').html('')
  if (!sel.node()) return
  var meta = data.metadata
  var D = window.difractDashboard
  var headerSel = sel.append('div.feature-header')
  var bodySel = sel.append('div.difract-feature-body')
  var cache = new Map()
  var shown = null

  function getJson(url) {
    if (!cache.has(url)) {
      cache.set(url, fetch(url, {cache: 'no-cache'}).then(r => r.ok ? r.json() : null).catch(() => null))
    }
    return cache.get(url)
  }

  var KIND_TEXT = {
    'mlp reconstruction error': 'error node: what the transcoder misses of this MLP output here',
    'unexplored feature residue': 'residue node: the summed direct effect of the active features here that were not expanded',
    'embedding': 'input node: this position\'s input to the first block',
    'logit': 'target: a function of the step\'s output (region × direction)',
  }

  async function show(d) {
    var key = d ? d.nodeId : null
    if (key === shown) return
    shown = key
    headerSel.html('')
    bodySel.html('')
    if (!d) {
      headerSel.append('div.no-selected-feature').text("Click or hover a node to see its feature's dashboard")
      return
    }
    var top = headerSel.append('div.header-top-row')
    top.append('div.feature-title').text(d.ppClerp || difract.name(d, meta))
      .classed('pinned', visState.pinnedIds.includes(d.nodeId))
      .on('click', ev => utilCg.clickFeature(visState, renderAll, d, ev.metaKey || ev.ctrlKey))
    if (!d.difract) {
      bodySel.append('div.difract-dash-h').text(KIND_TEXT[d.feature_type] || d.feature_type)
      return
    }
    if (typeof d.activation === 'number') {
      headerSel.append('div.difract-dash-stats').text(
        'activation here ' + D.fmt(d.activation, 3) + ' · influence ' + D.fmt(d.influence, 3))
    }
    var scan = await difract.dashboardScan(meta)
    var listing = await difract.dashboardListing()
    var site = d.difract.site
    var file = await getJson('./features/' + encodeURIComponent(meta.scan) + '/' + d.feature + '.json')
    if (shown !== key) return
    if (scan && listing.scans[scan].sites[site]) {
      var base = './dashboards/' + encodeURIComponent(scan) + '/'
      var payload = await getJson(base + 'feature/' + site + '/' + d.difract.feature + '.json')
      if (shown !== key) return
      if (payload) {
        var page = listing.scans[scan].pages[site]
        if (page) {
          bodySel.append('a.difract-page-link')
            .at({href: './' + page + '#' + d.difract.feature, target: '_blank'})
            .text('all features of ' + site + ' →')
        }
        if (file) {  // where it fires in this graph's step, beside its corpus examples
          var here = bodySel.append('div.difract-here')
          here.append('div.difract-dash-h').text('this graph\'s step:')
          renderThisStep(here, file, d, 'difract-examples')
        }
        D.renderDashboard(bodySel.append('div').node(), payload, {base, maxPerStep: 4})
        return
      }
    }
    // no dashboards: this graph's own step
    bodySel.append('div.difract-dash-h').text(
      'No corpus dashboards for ' + site + ' (build them with `difract dashboards`); ' +
      'showing this graph\'s step.')
    if (!file) {
      bodySel.append('div.difract-dash-h').text('no feature file for this graph either')
      return
    }
    renderThisStep(bodySel, file, d, 'difract-examples.difract-this-step')
  }

  // the per-graph feature file (this step's activation at every position) as one example
  function renderThisStep(parentSel, file, d, cls) {
    var acts = file.examples_quantiles?.[0]?.examples?.[0]?.tokens_acts_list || []
    var nTxt = meta.n_txt || 0
    var labels = file.examples_quantiles[0].examples[0].tokens || []
    var example = {
      prompt: meta.prompt, seed: meta.seed, step: meta.step, t: meta.timestep,
      act: d3.max(acts) || 0,
      image: meta.image ? './graph_data/' + meta.image : null,
      grid: meta.grid,
      tokens: labels.slice(0, nTxt).map(l => (/"(.*)"$/.exec(l) || [, l])[1]),
      token_acts: d.difract.stream === 'txt' ? acts.slice(0, nTxt) : [],
      patch_acts: d.difract.stream === 'img' ? acts.slice(nTxt) : [],
    }
    var strip = parentSel.append('div.' + cls).node()
    D.renderExample(strip, example, example.act, '')
  }

  var render = util.throttleDebounce(() => {
    var d = data.nodes.idToNode[visState.hoveredNodeId] || data.nodes.idToNode[visState.clickedId]
    show(d || null)
  }, 150)

  renderAll.hClerpUpdate.fns.push(() => { shown = undefined; render() })
  renderAll.clickedId.fns.push(render)
  renderAll.hoveredId.fns.push(render)
  renderAll.pinnedIds.fns.push(() => { shown = undefined; render() })
  show(data.nodes.idToNode[visState.clickedId] || null)
}
